"""vinehpc.Executor: concurrent.futures on vinehpc workers."""
from __future__ import annotations

import collections
import concurrent.futures as cf
import os
import threading

from . import _context
from .task import PythonTask, Resumable, TaskError


class _Future(cf.Future):
    """A Future whose cancel() while pending also withdraws its task from the manager."""

    def __init__(self, withdraw):
        super().__init__()
        self._withdraw = withdraw
        self.tid = None

    def cancel(self):
        if not super().cancel():
            return False        # running or done: too late, as concurrent.futures says
        if self.tid is not None:
            self._withdraw(self.tid)
        return True


class Executor(cf.Executor):
    """A concurrent.futures.Executor whose calls run as PythonTasks.

    Under `vinehpc run`/`pilot` it shares the run's open Manager (and so its workers), or
    creates one; alone it starts `max_workers` local workers (default: one per core).  Pass
    `manager=` to share a Manager of yours: the executor's tasks never come out of your
    `manager.wait()`.  Futures are concurrent.futures.Future objects, RUNNING once their call
    is sent to a worker (cancel() then fails; cancelling a pending one withdraws its task); a
    remote exception is re-raised as itself with the remote traceback as __cause__.
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
        """Run fn(*args, **kwargs) as a PythonTask on a worker; returns a concurrent.futures.Future
        whose result() is its value (or raises its exception). cancel() succeeds until the task is
        sent to a worker."""
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            task = PythonTask(fn, *args, **kwargs)
            fut = _Future(self.manager.cancel)
            # on_start marks the future RUNNING when the task is sent (cancel() fails from then on)
            fut.tid = self.manager.submit(task, on_start=self._started, on_done=self._deliver)
            self._futures[task.id] = (fut, task)
        return fut

    def _started(self, task):
        # on the manager's I/O thread; a future cancelled meanwhile has withdrawn its task (Cancel follows)
        with self._lock:
            fut, _ = self._futures.get(task.id, (None, None))
        if fut is not None and not fut.running():
            fut.set_running_or_notify_cancel()

    def _deliver(self, task):
        # called on the manager's I/O thread: hand over, do the unpickling on our thread
        with self._cv:
            self._done.append(task)
            self._cv.notify()

    def _collect(self):
        m = self.manager
        while True:
            with self._cv:
                while not self._done:
                    if m.error is not None:
                        return self._fail_all(TaskError("the manager failed: %r" % (m.error,)))
                    if m.drained:
                        return self._fail_all(Resumable("the run stopped for the walltime before this task ran"))
                    if m.closed:
                        return self._fail_all(TaskError("the manager was closed before this task finished"))
                    with self._lock:
                        if self._shutdown and not self._futures:
                            return
                    self._cv.wait(0.5)
                task = self._done.popleft()
            with self._lock:
                fut, _ = self._futures.pop(task.id, (None, None))
            if fut is None or fut.done() or not (fut.running() or fut.set_running_or_notify_cancel()):
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
            if fut.running() or fut.set_running_or_notify_cancel():
                fut.set_exception(exc)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            pending = list(self._futures.items()) if cancel_futures else []
        for tid, (fut, task) in pending:
            fut.cancel()                    # a pending one withdraws its task
        with self._cv:
            self._cv.notify()
        if wait:
            self._collector.join()
        if self._owns:
            self.manager.close("executor shut down")
