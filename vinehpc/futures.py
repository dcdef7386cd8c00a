"""vinehpc.Executor: concurrent.futures on vinehpc workers."""
from __future__ import annotations

import collections
import concurrent.futures as cf
import os
import threading

from . import _context
from .task import PythonTask, Resumable, TaskError


class Executor(cf.Executor):
    """A concurrent.futures.Executor whose calls run as PythonTasks.

    Under `vinehpc run`/`pilot` it shares the run's open Manager (and so its workers), or
    creates one; alone it starts `max_workers` local workers (default: one per core).  Pass
    `manager=` to share a Manager of yours: the executor's tasks never come out of your
    `manager.wait()`.  Futures are standard concurrent.futures.Future objects; a remote
    exception is re-raised as itself with the remote traceback as __cause__.
    """

    def __init__(self, max_workers: int | None = None, *, manager=None, **manager_kwargs):
        from .manager import Manager
        if max_workers is not None and (isinstance(max_workers, bool) or not isinstance(max_workers, int)
                                        or max_workers < 1):
            raise ValueError("max_workers must be a positive integer, got %r" % (max_workers,))
        ctx = _context.current()
        if manager is None and ctx is not None and not manager_kwargs:
            manager = ctx.open_manager()
        self._owns = manager is None
        if manager is None:
            if ctx is None and "port" not in manager_kwargs:
                manager_kwargs.setdefault("local_workers", max_workers or os.cpu_count() or 1)
            manager = Manager(**manager_kwargs)
        self.manager = manager
        self._futures = {}
        self._lock = threading.Lock()
        self._done = collections.deque()
        self._cv = threading.Condition()
        self._shutdown = False
        self._collector = threading.Thread(target=self._collect, name="vinehpc-executor", daemon=True)
        self._collector.start()

    def submit(self, fn, /, *args, **kwargs) -> cf.Future:
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            task = PythonTask(fn, *args, **kwargs)
            fut = cf.Future()
            self.manager._submit(task, self._deliver)
            self._futures[task.id] = (fut, task)
        return fut

    def _deliver(self, task):
        # called on the manager's I/O thread: hand over, do the unpickling on our thread
        with self._cv:
            self._done.append(task)
            self._cv.notify()

    def _collect(self):
        srv = self.manager._server
        while True:
            with self._cv:
                while not self._done:
                    if srv.error is not None:
                        return self._fail_all(TaskError("the manager failed: %r" % (srv.error,)))
                    if srv.drained:
                        return self._fail_all(Resumable("the run stopped for the walltime before this task ran"))
                    if self.manager._closed or srv.stopped.is_set():
                        return self._fail_all(TaskError("the manager was closed before this task finished"))
                    with self._lock:
                        if self._shutdown and not self._futures:
                            return
                    self._cv.wait(0.5)
                task = self._done.popleft()
            with self._lock:
                fut, _ = self._futures.pop(task.id, (None, None))
            if fut is None or not fut.set_running_or_notify_cancel():
                continue
            exc = task.exception
            if exc is None:
                fut.set_result(task.output)
            else:
                fut.set_exception(exc)

    def _fail_all(self, exc):
        with self._lock:
            items, self._futures = list(self._futures.values()), {}
        for fut, task in items:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(exc)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            pending = list(self._futures.items()) if cancel_futures else []
        for tid, (fut, task) in pending:
            if fut.cancel():
                self.manager.cancel(tid)
        with self._cv:
            self._cv.notify()
        if wait:
            self._collector.join()
        if self._owns:
            self.manager.close("executor shut down")
