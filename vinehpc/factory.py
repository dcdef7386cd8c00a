"""Factory: TaskVine's worker factory, for scripts that start their own workers.

TaskVine scripts (its Dask examples, Coffea's tests) write
    f = vine.Factory(manager=m); f.cores = 4; f.max_workers = 1
    with f: ... compute ...
Under `vinehpc run` or a pilot the run already gives the manager its workers, so a Factory
there starts nothing.  Alone, batch_type "local" starts `max(min_workers, 1)` local workers
of `cores` cores for the manager and stops them when the block ends; every other batch system
is the launchers' job (`vinehpc pilot`, jobscripts/vine.sh), so it is refused by name.
"""
from __future__ import annotations

import logging

from .local import LocalWorkers

log = logging.getLogger("vinehpc.factory")

# TaskVine's factory options (attribute names; "-" in the command-line spelling is "_" here).
# Those used to size local workers; the others are accepted and do nothing here.
SIZING = ("cores", "memory", "disk", "min_workers", "max_workers")
ACCEPTED = ("amazon_config", "autosize", "batch_options", "capacity_tolerance", "catalog", "condor_requirements",
            "config_file", "debug", "debug_file", "debug_file_size", "env", "extra_options", "factory_timeout",
            "gpus", "k8s_image", "k8s_worker_image", "manager_name", "mesos_master", "mesos_path",
            "mesos_preload", "password", "python_env", "python_package", "run_factory_as_manager", "runos",
            "scratch_dir", "ssl", "tasks_per_worker", "timeout", "worker_binary", "workers_per_cycle", "wrapper",
            "wrapper_input")


class Factory:
    """TaskVine's Factory(batch_type, manager, ...): options as attributes, start()/stop() or a
    `with` block.  See the module's docstring for what it does under a run and alone."""

    def __init__(self, batch_type="local", manager=None, manager_host_port=None, manager_name=None,
                 factory_binary=None, worker_binary=None, log_file=None):
        object.__setattr__(self, "_opts", {"min_workers": 1, "max_workers": 1, "cores": 1})
        object.__setattr__(self, "batch_type", batch_type)
        object.__setattr__(self, "manager", manager)
        object.__setattr__(self, "manager_host_port", manager_host_port)
        object.__setattr__(self, "_workers", None)
        if manager_name is not None:
            self._opts["manager_name"] = manager_name

    def __setattr__(self, name, value):
        if name not in SIZING and name not in ACCEPTED:
            raise AttributeError("%r is not a Factory option" % (name,))
        self._opts[name] = value

    def __getattr__(self, name):
        opts = object.__getattribute__(self, "_opts")
        if name in opts:
            return opts[name]
        if name in SIZING or name in ACCEPTED:
            return None
        raise AttributeError("%r is not a Factory option" % (name,))

    def set_environment(self, env) -> None:
        """Accepted (TaskVine: environment variables for the factory's workers): no effect."""
        self._opts["env"] = env

    def start(self) -> None:
        m = self.manager
        if m is not None and getattr(m, "_ctx", None) is not None:
            log.info("vinehpc: Factory: this run's workers serve the manager; the factory starts none")
            return
        if self._workers is not None:
            return
        if self.batch_type != "local":
            raise NotImplementedError("Factory(batch_type=%r): vinehpc starts workers on a batch system with its "
                                      "launchers (`vinehpc pilot`, jobscripts/vine.sh), not a factory; "
                                      "batch_type='local' starts local workers" % (self.batch_type,))
        if m is None:
            raise NotImplementedError("Factory(manager_host_port=...): vinehpc workers need the manager's secret; "
                                      "give the Manager itself: Factory(manager=m)")
        n = max(int(self._opts.get("min_workers") or 1), 1)
        w = LocalWorkers(n, cores=int(self._opts.get("cores") or 1), memory=self._opts.get("memory"),
                         disk=self._opts.get("disk"), worker_dir=m.settings.worker_dir)
        w.start("127.0.0.1:%d" % m.port, m.secret, m.tls_fingerprint)
        object.__setattr__(self, "_workers", w)

    def stop(self) -> None:
        """Stop the workers this factory started (at once: the manager may go on)."""
        w = self._workers
        object.__setattr__(self, "_workers", None)
        if w is not None:
            w.stop(timeout=0)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
