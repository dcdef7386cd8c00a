"""vinehpc.Executor: concurrent.futures on vinehpc workers."""
from __future__ import annotations

import concurrent.futures as cf
import os
import threading

from . import _context
from .task import PythonTask, TaskError


class Executor(cf.Executor):
    """A concurrent.futures.Executor whose calls run as PythonTasks.

    Under `vinehpc run`/`pilot` it uses the run's workers; alone it starts `max_workers`
    local workers (default: one per core).  Pass `manager=` to share an existing Manager.
    Futures are standard concurrent.futures.Future objects; a remote exception is re-raised
    as itself with the remote traceback as __cause__.
    """

    def __init__(self, max_workers: int | None = None, *, manager=None, **manager_kwargs):
        from .manager import Manager
        if max_workers is not None and (not isinstance(max_workers, int) or max_workers < 1):
            raise ValueError("max_workers must be a positive integer, got %r" % (max_workers,))
        if manager is None:
            if _context.current() is None and "port" not in manager_kwargs:
                manager_kwargs.setdefault("local_workers", max_workers or os.cpu_count() or 1)
            manager = Manager(**manager_kwargs)
            self._owns = True
        else:
            self._owns = False
        self.manager = manager
        self._futures = {}
        self._lock = threading.Lock()
        self._shutdown = False
        self._collector = threading.Thread(target=self._collect, name="vinehpc-executor", daemon=True)
        self._collector.start()

    def submit(self, fn, /, *args, **kwargs) -> cf.Future:
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            task = PythonTask(fn, *args, **kwargs)
            fut = cf.Future()
            self.manager.submit(task)
            self._futures[task.id] = (fut, task)
        return fut

    def _collect(self):
        m = self.manager
        while True:
            try:
                task = m.wait(0.5)
            except RuntimeError:
                self._fail_all("the manager failed")
                return
            if task is None:
                if self._shutdown and not self._futures:
                    return
                if m._closed:
                    self._fail_all("the manager was closed")
                    return
                continue
            with self._lock:
                fut, _ = self._futures.pop(task.id, (None, None))
            if fut is None or not fut.set_running_or_notify_cancel():
                continue
            exc = task.exception
            if exc is None:
                fut.set_result(task.output)
            else:
                fut.set_exception(exc)

    def _fail_all(self, why):
        with self._lock:
            items, self._futures = list(self._futures.values()), {}
        for fut, task in items:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(TaskError("task %s did not finish: %s" % (task.id, why)))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            pending = list(self._futures.items()) if cancel_futures else []
        for tid, (fut, task) in pending:
            if fut.cancel():
                self.manager.cancel(tid)
        if wait:
            self._collector.join()
        if self._owns:
            self.manager.close("executor shut down")
