"""vinehpc.FuturesExecutor: TaskVine's FuturesExecutor constructor and map() on vinehpc.Executor.

Everything else (futures as arguments, future_task, future_funcall, reduce, allpairs) is
vinehpc.Executor's own (vinehpc/futures.py); this class adds what differs from the standard
library's Executor: TaskVine's constructor arguments and TaskVine's map(), which returns ONE
future of the list of results instead of an iterator.
"""
from __future__ import annotations

import logging
import os

from . import _context
from .futures import Executor, gather

log = logging.getLogger("vinehpc.futures")


def _listen(port, **kwargs):
    """A Manager on `port`, or on the first free port of a [low, high] range (TaskVine's form)."""
    from .manager import Manager
    if not isinstance(port, (list, tuple)):
        return Manager(port=port, **kwargs)
    low, high = port
    for p in range(low, high):
        try:
            return Manager(port=p, **kwargs)
        except OSError:
            continue            # taken: the next one
    return Manager(port=high, **kwargs)     # the last: its error is the answer


class FuturesExecutor(Executor):
    """TaskVine's FuturesExecutor(port=9123, batch_type="local", manager=None, manager_host_port=None,
    manager_name=None, factory_binary=None, worker_binary=None, log_file=os.devnull, factory=True,
    opts={}).

    Under `vinehpc run`/`pilot` it uses the run's Manager and workers: port, factory and opts
    are then not used.  Alone, factory=True with batch_type="local" starts local workers:
    opts["min-workers"] of them (default: one per core), of opts["cores"] cores each (default
    1); factory=False listens on `port` for workers started with `vinehpc worker`.  Other
    batch types cannot be submitted to from here (run the script under `vinehpc pilot` or a
    Slurm job instead): the executor then waits for workers, as with factory=False.
    manager: a vinehpc Manager to share.  manager_host_port, factory_binary, worker_binary,
    log_file: accepted and not used (our workers are `python -m vinehpc worker`, our log is the
    run's journal).
    """

    def __init__(self, port=9123, batch_type="local", manager=None, manager_host_port=None, manager_name=None,
                 factory_binary=None, worker_binary=None, log_file=os.devnull, factory=True, opts=None):
        self.opts = dict(opts or {})
        self.manager_name = manager_name
        self.factory = None         # no vine_factory: workers come from the run, or from here (local)
        own = manager is None and _context.current() is None
        if own:
            local = factory and batch_type == "local"
            if factory and not local:
                log.warning("FuturesExecutor(batch_type=%r): vinehpc does not submit workers to a batch system; "
                            "run this script under `vinehpc pilot` or start `vinehpc worker`s", batch_type)
            n = self.opts.get("min-workers", self.opts.get("min_workers")) or os.cpu_count() or 1
            cores = self.opts.get("cores", 1)
            manager = _listen(port, **({"local_workers": n, "cores_per_worker": cores} if local else {}))
        super().__init__(manager=manager)
        if own:
            self._owns = True       # made here, closed with the executor (read when the collector ends)
        self.port = self.manager.port
        if manager_name and hasattr(self.manager, "set_name"):
            self.manager.set_name(manager_name)

    def set(self, name, value):
        """A factory option (TaskVine): kept in `opts`; it changes nothing once workers started."""
        self.opts[name] = value

    def get(self, name):
        return self.opts.get(name)

    def map(self, fn, iterable, library_name=None, method=None, chunk_size=1):
        """TaskVine's map: ONE future of [fn(x) for x in iterable] (fn(*x) for a tuple or list x),
        chunk_size items per task.  (vinehpc.Executor.map is the standard library's.)"""
        parts = self._chunks(fn, list(iterable), library_name, method, chunk_size)
        return gather(parts, lambda done: [v for part in done for v in part])


__all__ = ["FuturesExecutor"]
