"""Every VINEHPC_* and Slurm environment variable the engine and the launchers use is read
here, and only here: `Settings.from_env()` at an entry point (the `vinehpc` command, a
Manager() created by a script, a worker), then passed down.  Setting variables for child
processes happens elsewhere and is fine.  The leaves read their own few (sysimage_tools/config.py,
userlevel_net/config.py): they run on nodes without the engine.  tests/test_layers.py checks this.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field


def _float(env, name: str, default: float) -> float:
    v = env.get(name)
    if v is None or v == "":
        return default
    try:
        return float(v)
    except ValueError:
        raise ValueError("%s must be a number of seconds, got %r" % (name, v)) from None


def _flag(env, name: str) -> bool:
    v = env.get(name, "").strip().lower()
    if v in ("", "0", "no", "false", "off"):
        return False
    if v in ("1", "yes", "true", "on"):
        return True
    raise ValueError("%s must be 1 or 0, got %r" % (name, env[name]))


def _slurm_int(env, name):
    """The first number of a Slurm count: "2(x3),1" -> 2; unset, empty or not a number -> None."""
    head = (env.get(name) or "").split("(")[0].split(",")[0]
    try:
        return int(head)
    except ValueError:
        return None


@dataclass(frozen=True)
class Slurm:
    """What Slurm's environment says about this process's allocation (all None outside one)."""
    job_id: str | None = None
    job_name: str | None = None
    node_name: str | None = None           # SLURMD_NODENAME: this node's name in the allocation
    cpus_per_task: int | None = None       # SLURM_CPUS_PER_TASK
    cpus_on_node: int | None = None        # SLURM_CPUS_ON_NODE
    job_cpus_per_node: int | None = None   # SLURM_JOB_CPUS_PER_NODE (this node's: the first of the list)
    mem_per_cpu: int | None = None         # SLURM_MEM_PER_CPU, MB
    mem_per_node: int | None = None        # SLURM_MEM_PER_NODE, MB

    @classmethod
    def from_env(cls, env=None) -> "Slurm":
        env = os.environ if env is None else env
        return cls(job_id=env.get("SLURM_JOB_ID") or None, job_name=env.get("SLURM_JOB_NAME") or None,
                   node_name=env.get("SLURMD_NODENAME") or None,
                   cpus_per_task=_slurm_int(env, "SLURM_CPUS_PER_TASK"),
                   cpus_on_node=_slurm_int(env, "SLURM_CPUS_ON_NODE"),
                   job_cpus_per_node=_slurm_int(env, "SLURM_JOB_CPUS_PER_NODE"),
                   mem_per_cpu=_slurm_int(env, "SLURM_MEM_PER_CPU"),
                   mem_per_node=_slurm_int(env, "SLURM_MEM_PER_NODE"))


@dataclass(frozen=True)
class Settings:
    """The environment's configuration, read once (`Settings.from_env()`) and passed down."""
    secret: str | None = None             # VINEHPC_SECRET: the run's secret, for workers a launcher starts
    run_dir_root: str = "vine-run-info"   # VINEHPC_RUN_DIR: where run directories go (default ./vine-run-info)
    keepalive_interval: float = 5.0       # VINEHPC_KEEPALIVE_INTERVAL: seconds of silence before a ping
    keepalive_timeout: float = 30.0       # VINEHPC_KEEPALIVE_TIMEOUT: seconds of silence after which a peer is lost
    progress: str = "auto"               # VINEHPC_PROGRESS: progress line of `vinehpc run`: auto, always, never
    # VINEHPC_PROGRESS_INTERVAL: seconds between progress lines when stderr is not a terminal
    # (a pilot's or a batch job's log)
    progress_interval: float = 60.0
    # VINEHPC_WORKER_DIR: where a worker makes its cache and sandboxes when not given --workdir
    # (None: $TMPDIR or /tmp; local runs use /dev/shm when it has room)
    worker_dir: str | None = None
    # VINEHPC_MPI_INIT_TIMEOUT: seconds a pilot rank may spend in MPI_Init before it gives up with
    # tracebacks (a wrong `srun --mpi=` or a broken PMI otherwise hangs the allocation); 0: never
    mpi_init_timeout: float = 300.0
    grace: float = 60.0                   # VINEHPC_GRACE: seconds running tasks get after a pilot's walltime warning
    manager_host: str | None = None       # VINEHPC_MANAGER_HOST: the pilot manager's address for other hosts
    ssl: bool = False                     # VINEHPC_SSL=1: `vinehpc run`/`pilot` as with --ssl (TLS on the manager's port)
    # VINEHPC_TLS_FINGERPRINT: the manager's TLS certificate's, for workers a launcher starts
    tls_fingerprint: str | None = None
    # VINEHPC_TRANSFER_STALL: seconds without a byte after which a worker gives up a fetch from a peer
    # (the manager then asks another source)
    transfer_stall: float = 15.0
    slurm: Slurm = field(default_factory=Slurm)

    @classmethod
    def from_env(cls, env=None) -> "Settings":
        """Read the environment (`env`, default os.environ). Raises ValueError on a malformed number."""
        env = os.environ if env is None else env
        return cls(secret=env.get("VINEHPC_SECRET") or None,
                   run_dir_root=env.get("VINEHPC_RUN_DIR") or os.path.join(os.getcwd(), "vine-run-info"),
                   keepalive_interval=_float(env, "VINEHPC_KEEPALIVE_INTERVAL", 5.0),
                   keepalive_timeout=_float(env, "VINEHPC_KEEPALIVE_TIMEOUT", 30.0),
                   progress=env.get("VINEHPC_PROGRESS", "auto"),
                   progress_interval=_float(env, "VINEHPC_PROGRESS_INTERVAL", 60.0),
                   worker_dir=env.get("VINEHPC_WORKER_DIR") or None,
                   mpi_init_timeout=_float(env, "VINEHPC_MPI_INIT_TIMEOUT", 300.0),
                   grace=_float(env, "VINEHPC_GRACE", 60.0),
                   manager_host=env.get("VINEHPC_MANAGER_HOST") or None,
                   ssl=_flag(env, "VINEHPC_SSL"),
                   tls_fingerprint=env.get("VINEHPC_TLS_FINGERPRINT") or None,
                   transfer_stall=_float(env, "VINEHPC_TRANSFER_STALL", 15.0),
                   slurm=Slurm.from_env(env))

