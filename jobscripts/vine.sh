#!/bin/bash
# vinehpc pilot job: one manager and its workers inside ONE allocation.
#
#   sbatch -N 2 --ntasks-per-node=1 --cpus-per-task=2 jobscripts/vine.sh tasks.py [ARGS...]
#
# Rank 0 (on the first node) runs tasks.py with the manager; every other rank starts workers
# sized from the allocation. MPI is used only to meet (address + secret), so a lost node
# costs its workers, not the job. Results and the transactions log go to
# $VINEHPC_RUN_DIR (default: ./vine-run-info/pilot-<script> in the submit directory);
# submitting the same job again resumes: completed tasks are not run again.
#
# Environment overrides (export them before sbatch, or pass --export=ALL,VAR=...):
#   VINEHPC_PYTHON            python with vinehpc installed        (default: python3)
#   VINEHPC_VENV              a venv to activate first             (default: none)
#   VINEHPC_LAUNCHER          srun | mpiexec                        (default: srun)
#   VINEHPC_SRUN_MPI          srun's --mpi plugin                   (default: pmi2; Open MPI: pmix)
#                             (pip's MPICH wheel + pmi2 failing in MPI_Init with "mpi/pmi2: value not
#                             properly terminated": export MPIR_CVAR_CH4_NETMOD=ofi -- its UCX address breaks pmi2)
#   VINEHPC_MPIEXEC           the mpiexec to use with LAUNCHER=mpiexec (default: mpiexec)
#   VINEHPC_WORKERS_PER_NODE  workers per node                      (default: one per rank)
#   VINEHPC_CORES_PER_WORKER  cores per worker                      (default: the rank's CPUs)
#   VINEHPC_MANAGER_WORKS=1   also run workers on the manager's node
#   VINEHPC_GRACE             seconds running tasks get after the walltime warning (default 60)
#   VINEHPC_MPI_INIT_TIMEOUT  seconds a rank may hang in MPI_Init (wrong --mpi, broken PMI) before it
#                             exits with its tracebacks ("Timeout (...)!"), instead of idling to the walltime (300)
#   VINEHPC_RUN_DIR           run directory (keep it to resume; default as above)
#   VINEHPC_IMAGE             environment image (vinehpc sysimage): read once, broadcast to every node,
#                             unpacked on node-local disk ($VINEHPC_LOCAL_DIR); every task runs inside it
#   VINEHPC_TUNNEL=1          tasks reach the outside through the manager's node (compute nodes without
#                             outbound access); or VINEHPC_TUNNEL=HOST:PORT of a `vinehpc net gateway`
#
#SBATCH --job-name=vinehpc
#SBATCH --output=vinehpc-%j.out
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --time=01:00:00
# Slurm sends USR1 to this script (B: this shell only) 120 s before the walltime. This script
# passes NO signal on: it asks the manager to drain with `vinehpc drain RUN_DIR` (an authenticated
# request file in the run directory, which you can also write by hand). The manager stops
# dispatching, lets running tasks finish within VINEHPC_GRACE, records what completed and exits
# RESUMABLE (75). A warning that comes before the pilot is up waits in the run directory: the
# pilot then runs nothing and exits 75. TERM (scancel, preemption) does the same with at most 5 s
# of grace. Who handles USR1 if someone sends it anyway: the pilot's ranks and its workers (and
# the worker's Python interpreters that run PythonTasks) catch it and go on; command tasks keep
# the default action (it ends them), so never use --signal=USR1@N without B: with vinehpc.
#SBATCH --signal=B:USR1@120

warned=""                 # the warning is remembered from the first command on
trap 'warned=${warned:-USR1}' USR1
trap 'warned=${warned:-TERM}' TERM
set -uo pipefail
export VINEHPC_JOB_T0=${VINEHPC_JOB_T0:-$(date +%s.%N)}   # when the job started (for timings)

if [ $# -lt 1 ]; then
    echo "usage: sbatch [options] $0 tasks.py [ARGS...]" >&2
    exit 2
fi
if [ -n "${VINEHPC_VENV:-}" ]; then
    # shellcheck disable=SC1091
    source "$VINEHPC_VENV/bin/activate"
fi
PY=${VINEHPC_PYTHON:-python3}

opts=()
[ -n "${VINEHPC_WORKERS_PER_NODE:-}" ] && opts+=(--workers-per-node "$VINEHPC_WORKERS_PER_NODE")
[ -n "${VINEHPC_CORES_PER_WORKER:-}" ] && opts+=(--cores-per-worker "$VINEHPC_CORES_PER_WORKER")
[ "${VINEHPC_MANAGER_WORKS:-0}" = 1 ] && opts+=(--manager-node-works)
# the run directory is fixed here (the same default as `vinehpc pilot`), so that a drain request
# can be written there before the pilot is up
script_name=$(basename -- "$1")
RUN_DIR=${VINEHPC_RUN_DIR:-vine-run-info/pilot-${script_name%.*}}
case $RUN_DIR in /*) ;; *) RUN_DIR=$PWD/$RUN_DIR ;; esac
opts+=(--run-dir "$RUN_DIR")
[ -n "${VINEHPC_GRACE:-}" ] && opts+=(--grace "$VINEHPC_GRACE")
[ -n "${VINEHPC_IMAGE:-}" ] && opts+=(--image "$VINEHPC_IMAGE")
case "${VINEHPC_TUNNEL:-0}" in
    0|"") ;;
    1)    opts+=(--tunnel) ;;
    *)    opts+=(--tunnel-gateway "$VINEHPC_TUNNEL") ;;
esac

echo "vinehpc: job ${SLURM_JOB_ID:-?} on ${SLURM_JOB_NODELIST:-?} (${SLURM_NNODES:-?} nodes), $(date -Is)"
case "${VINEHPC_LAUNCHER:-srun}" in
    srun)    launch=(srun --mpi="${VINEHPC_SRUN_MPI:-pmi2}" --kill-on-bad-exit=0) ;;
    mpiexec) launch=("${VINEHPC_MPIEXEC:-mpiexec}" -n "${SLURM_NTASKS:-1}") ;;
    *) echo "vinehpc: VINEHPC_LAUNCHER must be srun or mpiexec, got '$VINEHPC_LAUNCHER'" >&2; exit 2 ;;
esac

# the drain request for a warning (USR1) or TERM; only the first one counts
requested=""
request_drain() {
    [ -n "$requested" ] && return
    requested=$1
    echo "vinehpc: $1 received ($(date -Is)): asking the manager to drain (vinehpc drain $RUN_DIR)"
    "$PY" -m vinehpc drain "$RUN_DIR" --job "${SLURM_JOB_ID:-}" --why "$1" \
        || echo "vinehpc: the drain request failed (above): the job runs until Slurm ends it"
}
trap 'request_drain USR1' USR1
trap 'request_drain TERM' TERM
[ -n "$warned" ] && request_drain "$warned"    # came before the traps above: the request waits for the pilot

# One launch line. It runs in the background so that this script can act on the warning
# while the pilot runs.
"${launch[@]}" "$PY" -m vinehpc pilot "${opts[@]}" "$@" &
step=$!
rc=0
while :; do
    wait "$step"; rc=$?
    kill -0 "$step" 2>/dev/null || break     # wait returns early when a trapped signal arrives
done
case $rc in
    0)  echo "vinehpc: done, $(date -Is)" ;;
    75) echo "vinehpc: stopped early and RESUMABLE: submit the same job again to run what is left" ;;
    *)  echo "vinehpc: the pilot failed with exit code $rc" ;;
esac
exit "$rc"
