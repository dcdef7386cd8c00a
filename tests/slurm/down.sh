#!/usr/bin/env bash
# Stop what tests/slurm/up.sh started (by pid file) and wipe its state.
#   WIPE=0       keep the spool directories (state); the logs in /var/log/vinehpc-slurm always stay
#   KEEP_MUNGE=1 leave munged running even if up.sh started it
# munged is stopped only if up.sh started it; /etc/slurm/slurm.conf is removed only if
# it carries up.sh's marker. Always exits 0 (a teardown must not fail a test session).
set -uo pipefail
export PATH="$PATH:/usr/sbin:/sbin:/usr/bin:/bin"

. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

[ "$(id -u)" = 0 ] || { echo "down.sh: not root, nothing to do" >&2; exit 0; }
# one up.sh/down.sh at a time
exec 9>>"$LOCK"
flock -w 170 9 || echo "down.sh: waited 170 s for $LOCK; going on anyway" >&2

# pid of a live (not zombie) process named $2 from pid file $1, or nothing
live_pid() {
    local p st
    p=$(cat "$1" 2>/dev/null) || return 0
    [ -n "$p" ] && [ -r "/proc/$p/stat" ] || return 0
    st=$(sed 's/^.*) //' "/proc/$p/stat" 2>/dev/null | cut -d' ' -f1)
    [ -n "$st" ] && [ "$st" != Z ] && [ "$(cat "/proc/$p/comm" 2>/dev/null)" = "$2" ] && echo "$p"
    return 0
}

running() {  # is pid $1 alive and not a zombie
    local st
    [ -r "/proc/$1/stat" ] || return 1
    st=$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)
    [ -n "$st" ] && [ "$st" != Z ]
}

pids=()
for f in "$RUN"/slurmd-*.pid "$RUN"/slurmctld.pid; do
    [ -f "$f" ] || continue
    case "$f" in *slurmctld.pid) c=slurmctld ;; *) c=slurmd ;; esac
    p=$(live_pid "$f" "$c")
    [ -n "$p" ] && { kill "$p" 2>/dev/null; pids+=("$p"); }
    rm -f "$f"
done
if [ "${KEEP_MUNGE:-0}" != 1 ] && [ -f "$RUN/munged.ours" ]; then
    p=$(live_pid /run/munge/munged.pid munged)
    [ -n "$p" ] && { kill "$p" 2>/dev/null; pids+=("$p"); }
    rm -f "$RUN/munged.ours"
fi

# killed daemons may linger as zombies until PID 1 reaps them: those count as gone
for i in $(seq 50); do
    left=0
    for p in "${pids[@]:-}"; do [ -n "$p" ] && running "$p" && left=1; done
    [ "$left" = 0 ] && break
    sleep 0.1
done
for p in "${pids[@]:-}"; do [ -n "$p" ] && running "$p" && kill -9 "$p" 2>/dev/null; done

if [ -f "$CONF" ] && grep -qxF "$MARK" "$CONF"; then
    rm -f "$CONF"
fi
if [ "${WIPE:-1}" = 1 ]; then
    rm -rf "$SPOOL" "$TMPBASE"-*    # logs stay for post-mortems; up.sh truncates them
fi
true
