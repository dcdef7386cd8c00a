#!/usr/bin/env bash
# Bring up a throw-away 2-node Slurm cluster on this one host, without systemd.
#
#   bash tests/slurm/up.sh        (as root; tests/slurm/down.sh undoes it)
#
# Nodes n1 and n2 are two slurmd processes on this host (`slurmd -N n1`, `-N n2`,
# Port=17001-17002), one slurmctld, munge. Recipe: HPC-TESTBED.md section 1.
# Installs slurmctld slurmd slurm-client munge with apt if they are missing
# (VINEHPC_SLURM_PMIX=1 adds libpmix-dev, needed only for `srun --mpi=pmix`;
# MPICH from PyPI uses --mpi=pmi2, which needs nothing more).
#
# Idempotent: when our cluster is already up with this very configuration and both
# nodes respond, it only prints sinfo (well under a second). Otherwise it stops
# whatever it started before, wipes the state and starts afresh.
#
# Everything but the config lives in our own directories (/run/vinehpc-slurm,
# /var/spool/vinehpc-slurm, /var/log/vinehpc-slurm, /tmp/vinehpc-slurm-tmp-nN).
# The config goes to /etc/slurm/slurm.conf, where every client (sbatch, srun, any
# subprocess, any shell) finds it without SLURM_CONF; it carries a marker line, and a
# slurm.conf without the marker (a real cluster's) is never overwritten.
#
# Exit status: 0 the cluster is up (sinfo printed); 1 it did not come up (the log
# tails are printed to stderr); 2 it cannot run here: not root, the packages cannot
# be installed, a foreign slurm.conf or Slurm daemon (the pytest fixture skips on 2
# outside CI and fails in CI).
set -uo pipefail
export PATH="$PATH:/usr/sbin:/sbin:/usr/bin:/bin"
export DEBIAN_FRONTEND=noninteractive

NODES="n1 n2"
NNODES=2
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
WAIT=${VINEHPC_SLURM_WAIT:-30}
PKGS=(slurmctld slurmd slurm-client munge)
[ "${VINEHPC_SLURM_PMIX:-0}" = 1 ] && PKGS+=(libpmix-dev)

say() { echo "up.sh: $*" >&2; }
cannot() { say "CANNOT RUN HERE: $*"; exit 2; }

# pid file $1 names a live (not zombie) process whose comm is $2
alive() {
    local p st
    p=$(cat "$1" 2>/dev/null) || return 1
    [ -n "$p" ] && [ -r "/proc/$p/stat" ] || return 1
    st=$(sed 's/^.*) //' "/proc/$p/stat" 2>/dev/null | cut -d' ' -f1)
    [ -n "$st" ] && [ "$st" != Z ] && [ "$(cat "/proc/$p/comm" 2>/dev/null)" = "$2" ]
}

# pids of live (not zombie) processes named $1 (no pgrep: procps may be missing)
live_pids() {
    local d p st out=()
    for d in /proc/[0-9]*; do
        [ "$(cat "$d/comm" 2>/dev/null)" = "$1" ] || continue
        p=${d#/proc/}
        st=$(sed 's/^.*) //' "$d/stat" 2>/dev/null | cut -d' ' -f1)
        [ -n "$st" ] && [ "$st" != Z ] && out+=("$p")
    done
    echo "${out[*]:-}"
}

# known noise on every start: no PMIx library (libpmix-dev not installed), no saved state
NOISE='pmix|PMIx|Could not open .* state file|Trying backup state save|to recover$'
log_tails() {
    local f
    for f in "$LOGDIR"/slurmctld.log "$LOGDIR"/slurmd-*.log /var/log/munge/munged.log; do
        [ -f "$f" ] || continue
        echo "----- last lines of $f (without known noise) -----"
        grep -v -E "$NOISE" "$f" | tail -n 25
    done
}

[ "$(id -u)" = 0 ] || cannot "must run as root (starts slurmctld/slurmd/munged, writes $CONF)"

# one up.sh/down.sh at a time (e.g. several pytest-xdist workers bringing the cluster up).
# The daemons are started with fd 9 closed, or they would hold the lock forever.
exec 9>>"$LOCK"
flock -w 170 9 || { say "waited 170 s for $LOCK"; exit 1; }

# ---------------------------------------------------------------- packages
have_all() {
    command -v slurmctld && command -v slurmd && command -v sbatch && command -v sinfo \
        && command -v munged && command -v munge || return 1
    [ "${VINEHPC_SLURM_PMIX:-0}" != 1 ] || dpkg -s libpmix-dev
} >/dev/null 2>&1

if ! have_all; then
    command -v apt-get >/dev/null 2>&1 || cannot "Slurm is not installed and there is no apt-get"
    t0=$SECONDS
    # No init system here: make sure the postinsts do not try to start the daemons
    # (with no slurm.conf yet they would fail, or start with a config that is not ours).
    made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && made_policy=1
    fi
    APTLOG=/tmp/vinehpc-slurm-apt.log
    : > "$APTLOG"
    apt_install() {
        apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=120 "${PKGS[@]}" >> "$APTLOG" 2>&1
    }
    ok=0
    if apt_install; then ok=1
    else
        say "apt-get install failed; running apt-get update once and retrying"
        apt-get update -q -o DPkg::Lock::Timeout=120 >> "$APTLOG" 2>&1 && apt_install && ok=1
    fi
    [ "$made_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
    if [ "$ok" != 1 ] || ! have_all; then
        tail -n 30 "$APTLOG" >&2
        cannot "could not install ${PKGS[*]} with apt (log: $APTLOG)"
    fi
    say "installed ${PKGS[*]} in $((SECONDS - t0)) s"
fi

# ---------------------------------------------------------------- config
if [ -e "$CONF" ] && ! grep -qxF "$MARK" "$CONF"; then
    cannot "$CONF exists and was not written by this script (a real cluster?); not touching it"
fi

# slurmctld compares SlurmctldHost with the short hostname; addresses are given
# explicitly (127.0.0.1), so the hostname need not resolve.
H=$(uname -n); H=${H%%.*}
[ -n "$H" ] || H=localhost

want_conf() {
    cat <<EOF
$MARK
ClusterName=vinehpc
SlurmctldHost=$H(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=6817
StateSaveLocation=$SPOOL/ctld
SlurmdSpoolDir=$SPOOL/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd-%n.log
# per-node TmpFS: two slurmd on one host otherwise collide on /tmp/spmix_appdir_* (mpi/pmix)
TmpFS=$TMPBASE-%n
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MailProg=/bin/true
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
# finished jobs stay visible to 'scontrol show job' for 5 minutes (there is no accounting)
MinJobAge=300
KillWait=5
Waittime=0
NodeName=n[1-$NNODES] NodeHostname=$H NodeAddr=127.0.0.1 Port=17001-$((17000 + NNODES)) CPUs=2 RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}
WANT=$(want_conf)

# node states, one "name state" per line ('*' suffix = not responding)
node_states() { timeout 10 sinfo -h -N -o '%N %t' 2>/dev/null | sort -u; }

healthy() {
    local n st ok=0
    [ -f "$CONF" ] && [ "$(cat "$CONF")" = "$WANT" ] || return 1
    alive "$RUN/slurmctld.pid" slurmctld || return 1
    for n in $NODES; do alive "$RUN/slurmd-$n.pid" slurmd || return 1; done
    munge -n >/dev/null 2>&1 || return 1
    while read -r n st; do
        case "$st" in idle|alloc|mix|comp) ok=$((ok + 1)) ;; esac
    done < <(node_states)
    [ "$ok" = "$NNODES" ]
}

if healthy; then
    sinfo
    exit 0
fi

# ---------------------------------------------------------------- (re)start
t0=$(date +%s.%N)

# stop what an earlier run of this script started (by pid file), then wipe its state
stop_ours() {
    local f pids=() i
    for f in "$RUN"/slurmd-*.pid "$RUN"/slurmctld.pid; do
        [ -f "$f" ] || continue
        case "$f" in *slurmctld.pid) c=slurmctld ;; *) c=slurmd ;; esac
        if alive "$f" "$c"; then pids+=("$(cat "$f")"); kill "$(cat "$f")" 2>/dev/null; fi
        rm -f "$f"
    done
    for i in $(seq 50); do
        local left=0 p
        for p in "${pids[@]:-}"; do
            [ -n "$p" ] && [ -r "/proc/$p/stat" ] && [ "$(sed 's/^.*) //' "/proc/$p/stat" | cut -d' ' -f1)" != Z ] && left=1
        done
        [ "$left" = 0 ] && break
        sleep 0.1
    done
    for p in "${pids[@]:-}"; do [ -n "$p" ] && kill -9 "$p" 2>/dev/null; done
    return 0
}
stop_ours

others="$(live_pids slurmctld) $(live_pids slurmd)"
if [ -n "${others// /}" ]; then
    cannot "Slurm daemons not started by this script are running (pids:$others); stop them first"
fi

rm -rf "$SPOOL" "$TMPBASE"-*
mkdir -p "$RUN" "$SPOOL/ctld" "$LOGDIR" /etc/slurm
for n in $NODES; do mkdir -p "$SPOOL/$n" "$TMPBASE-$n"; done
: > "$LOGDIR/slurmctld.log"
for n in $NODES; do : > "$LOGDIR/slurmd-$n.log"; done

# --- munge (Debian's postinst writes /etc/munge/munge.key) ---
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
chmod 755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --force && chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
fi
if ! munge -n >/dev/null 2>&1; then
    if out=$(runuser -u munge -- /usr/sbin/munged 2>&1 9>&-); then
        touch "$RUN/munged.ours"
    else
        say "munged failed to start: $out"
    fi
    for i in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done
    if ! munge -n >/dev/null 2>&1; then
        say "munge does not work"; log_tails >&2; exit 1
    fi
fi

# --- config (atomic replace) ---
printf '%s\n' "$WANT" > "$CONF.vinehpc-tmp" && mv -f "$CONF.vinehpc-tmp" "$CONF"

# --- daemons (they daemonize themselves and write the pid files) ---
if ! out=$(slurmctld -f "$CONF" 2>&1 9>&-); then
    say "slurmctld failed to start: $out"; log_tails >&2; exit 1
fi
for n in $NODES; do
    if ! out=$(slurmd -f "$CONF" -N "$n" 2>&1 9>&-); then
        say "slurmd -N $n failed to start: $out"; log_tails >&2; exit 1
    fi
done

deadline=$((SECONDS + WAIT))
while :; do
    idle=0
    while read -r n st; do [ "$st" = idle ] && idle=$((idle + 1)); done < <(node_states)
    [ "$idle" = "$NNODES" ] && break
    if [ "$SECONDS" -ge "$deadline" ]; then
        say "the $NNODES nodes are not idle after $WAIT s"
        { sinfo -N 2>&1; log_tails; } >&2
        exit 1
    fi
    sleep 0.2
done
say "daemons started, $NNODES nodes idle in $(awk "BEGIN { printf \"%.1f\", $(date +%s.%N) - $t0 }") s"
sinfo
