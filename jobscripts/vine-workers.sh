#!/bin/bash
# Extra workers for a running vinehpc pilot, from another allocation.
#
#   sbatch -N 4 jobscripts/vine-workers.sh vine-run-info/pilot-tasks/contact.json
#
# The contact file (mode 0600: the manager's address and the run's secret) is written by the
# pilot in its run directory. Each node runs one worker with the node's CPUs; workers leave
# when the pilot ends.
#SBATCH --job-name=vinehpc-workers
#SBATCH --output=vinehpc-workers-%j.out
#SBATCH --ntasks-per-node=1
#SBATCH --time=01:00:00
set -uo pipefail
if [ $# -ne 1 ] || [ ! -f "$1" ]; then
    echo "usage: sbatch [options] $0 RUN_DIR/contact.json" >&2
    exit 2
fi
if [ -n "${VINEHPC_VENV:-}" ]; then
    # shellcheck disable=SC1091
    source "$VINEHPC_VENV/bin/activate"
fi
PY=${VINEHPC_PYTHON:-python3}
exec srun --mpi=none "$PY" -m vinehpc worker --contact "$1" --cores "${SLURM_CPUS_ON_NODE:-1}" --exit-on-refused
