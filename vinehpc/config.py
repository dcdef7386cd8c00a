"""Every VINEHPC_* environment variable is read here, and only here."""
from __future__ import annotations

import os


def _float(name: str, default: float) -> float:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return float(v)
    except ValueError:
        raise ValueError("%s must be a number of seconds, got %r" % (name, v)) from None


def secret(*, take: bool = False) -> str | None:
    """VINEHPC_SECRET: the run's secret, for workers started by a launcher.  take=True also
    removes it from the environment, so that the tasks a worker starts do not inherit it."""
    return (os.environ.pop if take else os.environ.get)("VINEHPC_SECRET", None) or None


def run_dir_root() -> str:
    """VINEHPC_RUN_DIR: where run directories go (default ./vine-run-info)."""
    return os.environ.get("VINEHPC_RUN_DIR") or os.path.join(os.getcwd(), "vine-run-info")


def keepalive_interval() -> float:
    """VINEHPC_KEEPALIVE_INTERVAL: seconds of silence before a ping (default 5)."""
    return _float("VINEHPC_KEEPALIVE_INTERVAL", 5.0)


def keepalive_timeout() -> float:
    """VINEHPC_KEEPALIVE_TIMEOUT: seconds of silence after which a peer is lost (default 30)."""
    return _float("VINEHPC_KEEPALIVE_TIMEOUT", 30.0)


def grace() -> float:
    """VINEHPC_GRACE: seconds running tasks get after a drain request or the walltime warning (60)."""
    return _float("VINEHPC_GRACE", 60.0)


def progress() -> str:
    """VINEHPC_PROGRESS: 'auto' (a terminal), 'always' or 'never'."""
    return os.environ.get("VINEHPC_PROGRESS", "auto")


def worker_dir_root() -> str | None:
    """VINEHPC_WORKER_DIR: where a worker makes its cache and sandboxes when not given --workdir
    (default: $TMPDIR or /tmp; local runs use /dev/shm when it has room)."""
    return os.environ.get("VINEHPC_WORKER_DIR") or None


def mpi_init_timeout() -> float:
    """Seconds a pilot rank may spend in MPI_Init before it gives up with tracebacks
    (a wrong `srun --mpi=` or a broken PMI otherwise hangs the allocation silently); 0: never."""
    return _float("VINEHPC_MPI_INIT_TIMEOUT", 300.0)
