"""A long-lived Python interpreter that runs PythonTask functions for its worker.

Started by the worker with one end of a socketpair on fd 3.  Functions arrive once (by
content id) and stay deserialized, and modules they import stay imported, so neither is
paid again for the next task.  A serverless library (vinehpc/serverless.py) arrives the same
way, as a dict of functions: loaded at its first call (hoisted imports, context function),
its calls run here ("direct") or in a fork of this process ("fork"), and "forget" drops it.
Messages are length-prefixed pickles between this process
and its own worker (which authenticated the manager before forwarding anything).
Stdlib + cloudpickle only, so it runs from a packed image.
"""
import io
import os
import pickle
import shutil
import socket
import struct
import sys
import time
import traceback
import types

LEN = struct.Struct("!I")
MAX_OUT = 1 << 20
# where vinehpc.serverless.load_variable_from_library finds the running library's context values
LIBRARY_VARS = sys.modules.setdefault("_vinehpc_library_vars", types.ModuleType("_vinehpc_library_vars"))
LIBRARY_VARS.vars = None
LIBRARY_ID = "lib-"        # how vinehpc.serverless names a library's content id (function ids are "fn-")
TASK_VAR = os.fsencode("VINEHPC_TASK")


def send(sock, obj):
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(LEN.pack(len(data)) + data)


class Reader:
    """Messages from the worker, read in large pieces: one recv usually brings a whole message
    (often the next one too, when the worker presented a task while this one ran), where reading
    the length and then the body cost two system calls per message."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()

    def next(self):
        buf = self.buf
        while True:
            if len(buf) >= 4:
                (n,) = LEN.unpack_from(buf)
                if len(buf) >= 4 + n:
                    with memoryview(buf) as v, v[4:4 + n] as body:
                        msg = pickle.loads(body)
                    del buf[:4 + n]
                    return msg
            b = self.sock.recv(1 << 16)
            if not b:
                raise EOFError
            buf += b


class Redirect:
    """The call's print()s and tracebacks go to `out`: sys.stdout and sys.stderr swapped for the
    call (what contextlib's redirect_stdout and redirect_stderr do, at a quarter of their cost,
    which counts on a call of tens of microseconds)."""
    __slots__ = ("out", "saved")

    def __init__(self, out):
        self.out = out

    def __enter__(self):
        self.saved = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = self.out

    def __exit__(self, *exc):
        sys.stdout, sys.stderr = self.saved


def dump_result(ok, value, tb):
    try:   # plain pickle is much faster for plain data; cloudpickle for what it cannot do
        return pickle.dumps((ok, value, tb), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        pass
    import cloudpickle
    try:
        return cloudpickle.dumps((ok, value, tb), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as e:
        # (an unpicklable return value is reported as the task's failure)
        if ok:
            value = TypeError("the function's return value cannot be pickled: %s: %s" % (type(e).__name__, e))
            tb = traceback.format_exc()
        else:
            value = RuntimeError("%s: %s (the exception itself could not be pickled)" % (type(value).__name__, value))
        return cloudpickle.dumps((False, value, tb), protocol=pickle.HIGHEST_PROTOCOL)


class Meter:
    """This interpreter's peak RSS and read/write counters over one task (Linux /proc; else None)."""

    def __init__(self):
        self.fds = {}
        for name, mode in (("status", os.O_RDONLY), ("io", os.O_RDONLY), ("clear_refs", os.O_WRONLY)):
            try:
                self.fds[name] = os.open("/proc/self/" + name, mode)
            except OSError:
                pass
        self.io0 = None
        self.rss0 = self.rss_end = None

    def _io(self):
        fd = self.fds.get("io")
        if fd is None:
            return None
        try:
            b = os.pread(fd, 256, 0)       # "rchar: N\nwchar: N\n..."
            i = b.index(b"\n")
            return int(b[7:i]), int(b[i + 8:b.index(b"\n", i + 1)])
        except (OSError, ValueError):
            return None

    def _status(self):
        """(peak RSS, current RSS) in bytes, from one read of /proc/self/status; None if unknown."""
        try:
            b = os.pread(self.fds["status"], 4096, 0)
            i = b.index(b"VmHWM:") + 6
            j = b.index(b"VmRSS:") + 6
            return int(b[i:b.index(b"kB", i)]) << 10, int(b[j:b.index(b"kB", j)]) << 10
        except (KeyError, OSError, ValueError):
            return None

    def start(self, slack=16 << 20):
        st = self._status()
        self.rss0 = st[1] if st else None
        fd = self.fds.get("clear_refs")
        # the peak is well above the current RSS: an earlier task's peak, to forget (resetting it
        # only then keeps the common case of small tasks cheap)
        if fd is not None and (st is None or st[0] > st[1] + slack):
            try:
                os.write(fd, b"5")       # reset the peak RSS (VmHWM) to the current RSS
            except OSError:
                self.fds.pop("clear_refs", None)
        self.io0 = self._io()

    def stop(self):
        """(peak rss bytes or None, chars read or None, chars written or None)"""
        st = self._status()
        self.rss_end = st[1] if st else None
        rss = st[0] if st and "clear_refs" in self.fds else None
        io = self._io()
        if io is None or self.io0 is None:
            return rss, None, None
        return rss, io[0] - self.io0[0], io[1] - self.io0[1]

    def grew(self, slack=4 << 20) -> bool:
        """Did the interpreter's RSS grow over the task (by more than slack)?"""
        return self.rss0 is not None and self.rss_end is not None and self.rss_end > self.rss0 + slack


def _malloc_trim():
    """glibc's malloc_trim, or None (not glibc).

    After a task that grew this interpreter, freed heap goes back to the OS, so the next task
    starts from the interpreter's own baseline and is measured -- and limited -- with its own
    memory, not what earlier tasks freed but glibc kept resident (after one big free glibc
    raises its mmap threshold up to 32 MB and keeps such blocks in the heap).  glibc's
    thresholds themselves are left alone: fixing them would make every numpy temporary over the
    threshold an mmap + page faults (2.6x slower on a loop of 2 MB temporaries here)."""
    try:
        import ctypes
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def library_call(lib, a, out):
    """(function, its arguments, fork?) for a call of library `lib` (vinehpc.serverless);
    the library is made ready in this interpreter at its first call: its hoisted modules
    imported, its context function run (in this first call's working directory, printing to
    the call's output `out`)."""
    if "vars" not in lib:
        with Redirect(out):
            load_library(lib)
    LIBRARY_VARS.vars = lib["vars"]
    name, a = a[0], a[1:]
    return lib["functions"][name], a, lib["mode"] == "fork"


def load_library(lib):
    """Import its hoisted modules (bound in its functions' globals); run its context function."""
    import importlib
    for name, binds in lib["hoist"]:        # [(global name, attribute or None: the module)]
        mod = importlib.import_module(name)
        top = name.split(".")[0]
        for gname, attr in binds:
            if attr:                    # from mod import attr as gname
                value = getattr(mod, attr)
            else:                       # import a.b binds a; import a.b as x binds a.b
                value = sys.modules[top] if gname == top else mod
            for f in lib["functions"].values():
                g = getattr(f, "__globals__", None)
                if g is not None:
                    g.setdefault(gname, value)
    ctx = lib["context"]
    values = None
    if ctx is not None:
        values = ctx[0](*ctx[1], **ctx[2])
        if not isinstance(values, dict):
            raise TypeError("the library's context function must return a dict of values for "
                            "load_variable_from_library, it returned %r" % type(values).__name__)
    lib["vars"] = values


def forked(fn, a, kw, sock):
    """Run fn in a fork of this interpreter: (pickled result, error, its output)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                     # the child: never returns
        code = 1
        try:
            os.close(r)
            os.close(sock.detach())  # the worker's socket is the parent's alone
            out = io.StringIO()
            try:
                with Redirect(out):
                    value = fn(*a, **kw)
                res, error = dump_result(True, value, None), None
            except BaseException as e:  # noqa: B902 - the call's failure, reported like a task's
                res = dump_result(False, e, traceback.format_exc())
                error = "raised %s: %s" % (type(e).__name__, str(e)[:500])
            data = memoryview(pickle.dumps((res, error, out.getvalue()[-MAX_OUT:]), protocol=pickle.HIGHEST_PROTOCOL))
            while data:
                data = data[os.write(w, data):]
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    with os.fdopen(r, "rb") as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                break
            chunks.append(b)
    _, status = os.waitpid(pid, 0)
    if not chunks or os.waitstatus_to_exitcode(status) != 0:
        code = os.waitstatus_to_exitcode(status)
        why = "killed by signal %d" % -code if code < 0 else "exit code %d" % code
        raise RuntimeError("the forked call died before returning (%s)" % why)
    return pickle.loads(b"".join(chunks))


def main(fd=3):
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the worker decides when we stop
    signal.signal(signal.SIGUSR1, lambda *a: None)  # a pilot's walltime warning is not for us
    sock = socket.socket(fileno=fd)
    reader = Reader(sock)
    fns = {}
    base_env = dict(os.environ)
    # os.environ's own bytes dict: comparing it costs ~1 us, os.environ's Mapping comparison ~100
    base_data = dict(os.environ._data)
    home = os.getcwd()          # the worker's directory: where we wait between tasks, never a task's
    # where a task without files runs: made once (a directory per task costs ~2 ms on some file
    # systems, more than a short task), made again if a task removed it, emptied if one left files
    scratch = os.path.join(home, "py-%d" % os.getpid())
    try:
        return _serve(sock, reader, fns, base_env, base_data, home, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _serve(sock, reader, fns, base_env, base_data, home, scratch):
    environ = os.environ._data
    meter = Meter()
    trim = _malloc_trim()
    while True:
        try:
            msg = reader.next()
        except (EOFError, OSError):
            return 0
        kind = msg[0]
        if kind == "fn":
            fns[msg[1]] = msg[2]      # kept as bytes until first use
            continue
        if kind == "forget":          # a removed library: free its functions and context now
            fns.pop(msg[1], None)
            if trim is not None:
                import gc
                gc.collect()
                trim(0)
            continue
        if kind == "exit":
            return 0
        _, tid, fid, args, cwd, env = msg
        value = a = kw = None
        # a library's call is not measured on its own (nor is it in TaskVine): four /proc reads
        # would be most of a short call's cost; a long one is still sampled by the worker
        library = fid.startswith(LIBRARY_ID)
        measured = not library
        if measured:
            meter.start()
        t0, c0 = time.perf_counter(), time.process_time()
        out = io.StringIO()
        try:
            if not cwd:     # no files: an existing, empty directory all the same (never a gone sandbox)
                cwd = scratch
                try:
                    os.chdir(scratch)       # (no stat first: the chdir says whether it is there)
                except FileNotFoundError:
                    os.makedirs(scratch)
                    os.chdir(scratch)
            else:
                os.chdir(cwd)
            if env:
                os.environ.update(env)
            # whose the processes it starts are (worker/orphans.py); set in os.environ's own bytes
            # dict and the C environment, what os.environ[k] = v does through six calls
            mark = b"%d" % tid
            os.putenv(TASK_VAR, mark)
            environ[TASK_VAR] = mark
            fn = fns[fid]
            if isinstance(fn, bytes):
                fn = fns[fid] = pickle.loads(fn)
            a, kw = pickle.loads(args)
            fork = False
            if isinstance(fn, dict):        # a library: the call's first argument names the function
                fn, a, fork = library_call(fn, a, out)
            if fork:
                res, error, text = forked(fn, a, kw, sock)
                out.write(text)
            else:
                with Redirect(out):
                    value = fn(*a, **kw)
                res, error = dump_result(True, value, None), None
        except BaseException as e:  # noqa: B902 - a task's SystemExit/KeyboardInterrupt is its failure
            res = dump_result(False, e, traceback.format_exc())
            error = "raised %s: %s" % (type(e).__name__, str(e)[:500])
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        rss, rd, wr = meter.stop() if measured else (None, None, None)
        text = out.getvalue()
        if len(text) > MAX_OUT:
            text = text[-MAX_OUT:]
        try:
            # the result first: undoing what the task changed here is not on its way back (the
            # next task's message waits in the socket until it is done)
            send(sock, ("done", tid, res, error, text, wall, cpu, rss, rd, wr))
        finally:
            if environ.pop(TASK_VAR, None) is not None:
                os.unsetenv(TASK_VAR)
            os.chdir(home)
            if cwd == scratch and os.listdir(scratch):
                _empty(scratch)
            # the worker's environment again, whatever the task set (its own env, os.environ edits);
            # a library's calls undo only their own env: its context may set variables its calls need
            if env or (not library and os.environ._data != base_data):
                os.environ.clear()
                os.environ.update(base_env)
        value = res = a = kw = None      # drop the task's objects before trimming
        if trim is not None and measured and meter.grew():
            trim(0)


def _empty(d):
    """Remove what a task left in directory d (d stays)."""
    for e in os.scandir(d):
        if e.is_dir(follow_symlinks=False):
            shutil.rmtree(e.path, ignore_errors=True)
        else:
            try:
                os.unlink(e.path)
            except OSError:
                pass


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 3))
