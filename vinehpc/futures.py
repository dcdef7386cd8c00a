"""vinehpc.Executor: concurrent.futures on vinehpc workers, with TaskVine's FuturesExecutor features.

The contract is the standard library's (checked with CPython's own executor tests,
tests/test_cf_conformance.py): a future is PENDING until its call is sent to a worker, RUNNING
from then on (cancel() then fails), and cancelling a pending one withdraws its task from the
manager.  shutdown(wait=False) lets pending calls finish; at interpreter exit every executor
still open is shut down with wait=True, as the standard executors do.

TaskVine's additions (vinehpc/futures_vine.py builds on these): futures passed as arguments
are dependencies (the call is sent once they complete and receives their values),
future_task() / future_funcall(), reduce() and allpairs().

What TaskVine's module `ndcctools.taskvine.futures` offers is here too, so its imports port by
changing the module's name: FuturesExecutor, FuturePythonTask, FutureFunctionCall, and wait,
as_completed and their constants (the standard library's own: our futures are standard futures).
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import functools
import inspect
import os
import sys
import threading
import weakref
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION, as_completed, wait  # noqa: F401
from concurrent.futures._base import CANCELLED, PENDING, RUNNING

from . import _context
from . import serverless
from .task import PythonTask, Resumable, TaskError

_live = weakref.WeakSet()      # executors whose collector still runs: the exit hook shuts them down
_exiting = False


def shutdown_all() -> None:
    """Shut down every executor still collecting, with wait=True: what the end of the program
    means for them (the interpreter's exit, or a script's end under `vinehpc run`/`pilot`)."""
    for ex in list(_live):
        ex.shutdown(wait=True)


def _at_exit():
    # like concurrent.futures' own hook: pending calls finish, later submits are refused
    global _exiting
    _exiting = True
    shutdown_all()


# The hook the standard executors use (concurrent/futures/thread.py): it runs when the main
# thread ends, before any atexit handler, so an atexit handler's submit() is refused as theirs is.
threading._register_atexit(_at_exit)


def __getattr__(name):
    if name == "FuturesExecutor":       # (futures_vine imports this module)
        from .futures_vine import FuturesExecutor
        return FuturesExecutor
    raise AttributeError("module %r has no attribute %r" % (__name__, name))


def _fn_name(task) -> str:
    fn = task.fn        # a function; a FunctionCall's: "library.function"
    return fn if isinstance(fn, str) else getattr(fn, "__qualname__", repr(fn))


class _FutureOutput:
    """TaskVine's futures tasks have output(timeout) as a method that waits, not a property."""

    def output(self, timeout="wait_forever"):
        """Wait for this call (`timeout` seconds; "wait_forever" or None: no limit) and return
        its value, or the exception it raised as a value (PythonTaskNoResult if none came back),
        as TaskVine's FuturePythonTask.output(timeout). Raises concurrent.futures.TimeoutError
        when it is not done in time (TaskVine returns the string "result_pending")."""
        if self.future is None:
            raise RuntimeError("this call of %s was not submitted: submit it with the executor first "
                               "(f = ex.submit(t)), then call t.output()" % (_fn_name(self),))
        if timeout in (None, "wait_forever"):
            timeout = None
        elif isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise ValueError("output(timeout=%r): give seconds, None or \"wait_forever\"" % (timeout,))
        try:
            return self.future.result(timeout)
        except (cf.TimeoutError, cf.CancelledError):
            raise
        except Exception as e:
            return e


class FuturePythonTask(_FutureOutput, PythonTask):
    """The task of one executor call: a PythonTask (set_cores, set_tag, ... apply) whose
    arguments may be futures; Executor.submit(task) returns its `future`; output(timeout) waits
    for it."""

    def __init__(self, fn, args=(), kwargs=None):
        # the arguments are set here, not passed on: a call's own `fn=` or `self=` keyword
        # must not collide with PythonTask's parameters
        super().__init__(fn)
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        self.future = None


class FutureFunctionCall(_FutureOutput, serverless.FunctionCall):
    """An executor call of an installed library's function (future_funcall): a FunctionCall
    whose arguments may be futures; Executor.submit(call) returns its `future`; output(timeout)
    waits for it."""

    def __init__(self, library, fn, args=(), kwargs=None):
        super().__init__(library, fn)
        self.set_fn_args(args, kwargs)
        self.future = None


class _Future(cf.Future):
    """A Future that knows its executor: cancel() while pending withdraws the call."""

    def __init__(self, executor):
        super().__init__()
        self._executor = executor
        self.tid = None          # the manager's task id, once the call is submitted to it

    def cancel(self):
        if not super().cancel():
            return False        # running or done: too late, as concurrent.futures says
        self._executor._withdraw(self)
        return True


def _start(fut) -> bool:
    """set_running_or_notify_cancel() at most once, from whichever thread gets there first: True
    when fut is now RUNNING; False when it is cancelled (its waiters are told) or finished.
    (Under the future's own lock, read through its private state: the public calls raise
    when a second thread calls them.)"""
    with fut._condition:
        if fut._state in (PENDING, CANCELLED):
            return fut.set_running_or_notify_cancel()
        return fut._state == RUNNING


def _value(arg):
    return arg.result(timeout=0) if isinstance(arg, cf.Future) else arg


def _fold(fn, arity, *values):
    """Runs on a worker: fn over `values` left to right, `arity` at a time
    (fn(fn(v0, v1), v2) for arity 2); len(values) is 1 + k*(arity-1)."""
    acc, rest = values[0], values[1:]
    while rest:
        acc, rest = fn(acc, *rest[:arity - 1]), rest[arity - 1:]
    return acc


def _apply_each(fn, items):
    """Runs on a worker: fn(*item) for a tuple or list item, fn(item) otherwise (TaskVine's rule)."""
    return [fn(*x) if isinstance(x, (tuple, list)) else fn(x) for x in items]


def _arity(fn) -> int:
    """The number of positional parameters without defaults (at least 2): how many values one
    call of a reduction function combines."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 2                # a builtin without a signature (max, min, ...): binary
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return 2
    n = sum(1 for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty)
    return max(2, n)


def _when_all(futures, then) -> None:
    """then() once every future in `futures` is done, on the thread that completes the last
    (at once when there is none): nothing blocks meanwhile."""
    fs = set(futures)
    if not fs:
        return then()
    left = [len(fs)]
    lock = threading.Lock()

    def one_done(_):
        with lock:
            left[0] -= 1
            if left[0]:
                return
        then()

    for f in fs:
        f.add_done_callback(one_done)


def gather(futures, combine) -> cf.Future:
    """A future of combine([f.result() for f in futures]), or of the first exception among them."""
    out = cf.Future()
    out.set_running_or_notify_cancel()
    futures = list(futures)

    def settle():
        try:
            out.set_result(combine([f.result(timeout=0) for f in futures]))
        except BaseException as e:  # noqa: B902 - a cancelled or failed part is the whole's failure
            out.set_exception(e)

    _when_all(futures, settle)
    return out


class Executor(cf.Executor):
    """A concurrent.futures.Executor whose calls run as PythonTasks.

    Under `vinehpc run`/`pilot` it shares the run's open Manager (and so its workers), or
    creates one; alone it starts `max_workers` local workers (default: one per core).  Pass
    `manager=` to share a Manager of yours: the executor's tasks never come out of your
    `manager.wait()`.  A remote exception is re-raised as itself with the remote traceback as
    __cause__; what a call prints (stdout and stderr, merged) is written to this process's
    stdout when the call ends.  Other keyword arguments go to the Manager it creates.
    """

    def __init__(self, max_workers: int | None = None, *, manager=None, **manager_kwargs):
        from .manager import Manager
        if max_workers is not None:
            if isinstance(max_workers, bool) or not isinstance(max_workers, int):
                raise TypeError("max_workers must be an integer, got %r" % (max_workers,))
            if max_workers <= 0:
                raise ValueError("max_workers must be greater than 0")
        ctx = _context.current()
        if manager is None and ctx is not None and not manager_kwargs:
            manager = ctx.open_manager()
        self._owns = manager is None
        if manager is None:
            if ctx is None and "port" not in manager_kwargs:
                manager_kwargs.setdefault("local_workers", max_workers or os.cpu_count() or 1)
            manager = Manager(**manager_kwargs)
        self.manager = manager
        self._lock = threading.Lock()
        self._owed = set()          # futures not done yet (a shut-down executor ends when none is left)
        self._done = collections.deque()
        self._cv = threading.Condition()
        self._shutdown = False
        self._libraries = {}        # future_funcall's functions: library name -> {function name: function}
        self._collector = threading.Thread(target=self._collect, name="vinehpc-executor", daemon=True)
        self._collector.start()
        _live.add(self)

    # ---------------------------------------------------------------- submitting
    def submit(self, fn, /, *args, **kwargs) -> cf.Future:
        """Run fn(*args, **kwargs) as a PythonTask on a worker; returns a concurrent.futures.Future
        whose result() is its value (or raises its exception). Futures among the arguments are
        waited for (without blocking here) and replaced by their values; a task from future_task()
        or future_funcall() is submitted as is. cancel() succeeds until the task is sent to a worker."""
        if isinstance(fn, (FuturePythonTask, FutureFunctionCall)) and not args and not kwargs:
            task = fn
        else:
            task = FuturePythonTask(fn, args, kwargs)
        return self._submit(task)

    def future_task(self, fn, /, *args, **kwargs) -> FuturePythonTask:
        """The task of fn(*args, **kwargs), to configure (set_cores, set_tag, ...) and then submit()."""
        if not callable(fn):
            raise TypeError("future_task needs a callable, got %r" % (fn,))
        return FuturePythonTask(fn, args, kwargs)

    def _submit(self, task) -> cf.Future:
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after %s"
                                   % ("interpreter shutdown" if _exiting else "shutdown"))
            if task.future is not None:
                raise ValueError("task %r was already submitted; create a new one to run it again" % (task,))
            fut = task.future = _Future(self)
            self._owed.add(fut)
        deps = [a for a in (*task.args, *task.kwargs.values()) if isinstance(a, cf.Future)]
        if not deps:
            try:
                self._send(task, fut)
            except BaseException:
                self._retire(fut)
                raise               # a bad pickle or a closed manager: an error of submit(), as before
            return fut
        # the last dependency's done-callback sends the call: no thread of ours blocks meanwhile
        _when_all(deps, lambda: self._resolve(task, fut))
        return fut

    def _resolve(self, task, fut):
        try:
            task.args = tuple(_value(a) for a in task.args)
            task.kwargs = {k: _value(v) for k, v in task.kwargs.items()}
            self._send(task, fut)
        except BaseException as e:  # noqa: B902 - a failed or cancelled dependency fails this call
            self._fail(fut, e)

    def _send(self, task, fut):
        if fut.done():
            return              # cancelled while it waited for its dependencies, or failed with the manager
        # on_start marks the future RUNNING when the task is sent (cancel() fails from then on).
        # Submitting (pickling, hashing inputs) holds no lock: other threads submit meanwhile
        tid = self.manager.submit(task, on_start=self._started, on_done=self._deliver)
        with self._lock:
            fut.tid = tid
            withdrawn = fut.cancelled()
        if withdrawn:
            self.manager.cancel(tid)        # cancelled while it was being submitted

    def _withdraw(self, fut):
        """fut was just cancelled: take its task back from the manager (its return then notifies
        the waiters), or, not submitted yet, notify them now."""
        with self._lock:
            tid = fut.tid
        if tid is not None:
            self.manager.cancel(tid)
        else:
            _start(fut)
            self._retire(fut)

    def _fail(self, fut, exc):
        # no lock held: set_exception runs the done-callbacks, which may send dependent calls
        if _start(fut):
            fut.set_exception(exc)
        self._retire(fut)

    def _retire(self, fut):
        with self._cv:
            self._owed.discard(fut)
            self._cv.notify()

    # ---------------------------------------------------------------- results
    @staticmethod
    def _started(task):
        # on the manager's I/O thread, before its on_done; a future cancelled meanwhile has
        # withdrawn its task (_start then only notifies its waiters)
        _start(task.future)

    def _deliver(self, task):
        # called on the manager's I/O thread: hand over, do the unpickling on our thread
        with self._cv:
            self._done.append(task)
            self._cv.notify()

    def _collect(self):
        m = self.manager
        try:
            while True:
                with self._cv:
                    while not self._done:
                        if m.error is not None:
                            return self._fail_all(TaskError("the manager failed: %r" % (m.error,)))
                        if m.drained:
                            return self._fail_all(Resumable("the run stopped for the walltime before this task ran"))
                        if m.closed:
                            return self._fail_all(TaskError("the manager was closed before this task finished"))
                        if self._shutdown and not self._owed:
                            return
                        self._cv.wait(0.5)
                    task = self._done.popleft()
                self._complete(task)
                del task            # neither the task nor its value outlives the hand-over
        finally:
            _live.discard(self)
            if self._owns:
                m.close("executor shut down")

    def _complete(self, task):
        fut = task.future
        try:
            if not _start(fut):
                return              # a withdrawn (cancelled) call: its waiters are told now
            if task.std_output:
                sys.stdout.write(task.std_output)
                sys.stdout.flush()
            exc = task.exception
            if exc is None:
                fut.set_result(task._load()[1])     # (not .output: a method on the Future* tasks)
            else:
                fut.set_exception(exc)
        finally:
            self._retire(fut)

    def _fail_all(self, exc):
        with self._lock:
            owed, self._owed = list(self._owed), set()
        for fut in owed:
            if _start(fut):
                try:
                    fut.set_exception(exc)
                except cf.InvalidStateError:
                    pass            # a dependency's failure got there first

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No more submits.  cancel_futures: cancel the calls not sent to a worker yet (running
        ones finish).  Pending calls finish either way; wait: return once they have.  A
        Manager the executor created closes when the last call is done."""
        with self._lock:
            self._shutdown = True
        owed = []
        if cancel_futures:
            # "pending" is what waits behind busy workers, not what the manager has not seen yet:
            # let it take what it has room for (a scheduling pass runs after each batch of
            # events, so after the second of two round trips) and cancel the rest
            for _ in range(2):
                self.manager._call(lambda: None)
            with self._lock:
                owed = list(self._owed)
        for fut in owed:
            fut.cancel()
        with self._cv:
            self._cv.notify()
        if wait and threading.current_thread() is not self._collector:
            self._collector.join()

    # ---------------------------------------------------------------- TaskVine's abstractions
    def reduce(self, fn, iterable, library_name=None, method=None, chunk_size=1) -> cf.Future:
        """A future of fn folded over the values (futures among them are waited for), computed
        as a tree of tasks: one task folds up to chunk_size*(arity-1)+1 values, where arity is
        fn's number of positional parameters (2 for fn(a, b)).  fn must be associative."""
        values = list(iterable)
        arity = _arity(fn)
        if not values:
            raise ValueError("reduce of an empty sequence")
        if (len(values) - 1) % (arity - 1):
            raise ValueError("%d values cannot be reduced by a function of %d arguments: it needs 1 + k*%d"
                             % (len(values), arity, arity - 1))
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError("chunk_size must be a positive integer, got %r" % (chunk_size,))
        group = chunk_size * (arity - 1) + 1
        # fn travels as part of the task's function (by value, once per worker), not as an argument
        step = functools.partial(_fold, fn, arity)
        while True:
            nxt = []
            for i in range(0, len(values), group):
                part = values[i:i + group]
                take = 1 + (len(part) - 1) // (arity - 1) * (arity - 1)
                if take > 1 or len(values) == 1:
                    nxt.append(self._call(library_name, method, step, *part[:take]))
                else:
                    take = 0
                nxt.extend(part[take:])       # too few to fold here: carried to the next level
            values = nxt
            if len(values) == 1:
                return values[0]

    def allpairs(self, fn, iterable_a, iterable_b, library_name=None, method=None, chunk_size=1) -> cf.Future:
        """A future of the table fn(a, b): one row per b, one column per a (row j, column i is
        fn(a_i, b_j)); chunk_size pairs per task."""
        a, b = list(iterable_a), list(iterable_b)
        pairs = [(x, y) for y in b for x in a]
        parts = self._chunks(fn, pairs, library_name, method, chunk_size)
        return gather(parts, lambda done: _rows([v for part in done for v in part], len(a), len(b)))

    def _chunks(self, fn, items, library_name, method, chunk_size):
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError("chunk_size must be a positive integer, got %r" % (chunk_size,))
        each = functools.partial(_apply_each, fn)      # sent once per worker, as the function
        return [self._call(library_name, method, each, items[i:i + chunk_size])
                for i in range(0, len(items), chunk_size)]

    def _call(self, library_name, method, fn, *args):
        if method == "FutureFunctionCall":
            return self.submit(self.future_funcall(library_name, fn, *args))
        return self.submit(fn, *args)

    # ---------------------------------------------------------------- serverless (see future_funcall)
    def create_library_from_functions(self, name, *functions, **options):
        """Name a library of functions that future_funcall() can call (TaskVine's signature;
        the Manager's own library support builds the library when it has one)."""
        self._libraries[name] = {f.__name__: f for f in functions}
        make = getattr(self.manager, "create_library_from_functions", None)
        return make(name, *functions, **options) if make is not None else name

    def install_library(self, library):
        install = getattr(self.manager, "install_library", None)
        if install is not None and not isinstance(library, str):
            install(library)

    def future_funcall(self, library_name, fn, /, *args, **kwargs):
        """The call fn(*args, **kwargs) of library `library_name` (fn: the function's name, or the
        function), to submit(); futures among the arguments are dependencies.  A library
        installed on the manager (install_library) runs it warm, as a FunctionCall; one only
        created here runs it as a PythonTask of that function (same result and errors)."""
        lib = serverless.installed(library_name)
        if lib is not None:
            call = FutureFunctionCall(library_name, fn, args, kwargs)
            if call.function_name not in lib.functions:
                raise ValueError("library %r has no function %r (it has: %s)"
                                 % (library_name, call.function_name, ", ".join(sorted(lib.functions))))
            return call
        if isinstance(fn, str):
            try:
                fn = self._libraries[library_name][fn]
            except KeyError:
                raise ValueError("library %r has no function %r: create it with create_library_from_functions()"
                                 % (library_name, fn)) from None
        return self.future_task(fn, *args, **kwargs)


def _rows(flat, width, n):
    return [flat[j * width:(j + 1) * width] for j in range(n)]


__all__ = ["Executor", "FutureFunctionCall", "FuturePythonTask", "gather", "FuturesExecutor", "wait", "as_completed",
           "FIRST_COMPLETED", "FIRST_EXCEPTION", "ALL_COMPLETED"]
