"""The worker's long-lived Python interpreters (pyrunner.py), one per core at most.

Each interpreter keeps the functions it was sent (by content id) and the modules they
imported, so a function's bytes and its imports are paid once per interpreter.  A task
that kills its interpreter (os._exit, segfault, time limit) costs that interpreter only:
the next Python task starts a fresh one.
"""
from __future__ import annotations

import collections
import os
import pickle
import selectors
import signal
import socket
import struct
import subprocess
import sys

from ..comm.conn import recv_bytes
from .process import signal_name

LEN = struct.Struct("!I")
RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pyrunner.py")


class Runner:
    __slots__ = ("sock", "proc", "tid", "queued", "fids", "buf", "image", "devices", "out")

    def __init__(self, sock, proc, image=None, devices=None):
        self.sock, self.proc = sock, proc
        self.image = image        # id of the environment image it runs in (None: the worker's own)
        self.devices = devices    # its CUDA_VISIBLE_DEVICES, fixed at start (None: the worker's)
        self.tid = None
        self.queued = collections.deque()   # tasks presented to it, run after tid, in order
        self.out = []                       # messages for it not sent yet (PyPool.flush)
        self.fids = set()
        self.buf = bytearray()


class PyPool:
    def __init__(self, sel, *, max_runners: int, workdir: str, guard=None):
        self.sel = sel
        self.guard = guard
        self.max = max_runners
        self.workdir = workdir
        self.runners = []
        self.last_death = None
        self.pending = set()      # runners with messages in `out`

    def _spawn(self, image=None, devices=None):
        mine, theirs = socket.socketpair()
        code = "import runpy,sys; sys.argv=['pyrunner',%r]; runpy.run_path(%r, run_name='__main__')" % (
            str(theirs.fileno()), RUNNER)
        env = None
        if image is not None:   # inside the image: its packages, plus cloudpickle for our functions
            env = image.env_for(None, extra_pythonpath=[self._cloudpickle_only()])
        if devices is not None:
            # at start: CUDA reads it once per process, so a task's GPUs are its interpreter's
            env = dict(env if env is not None else os.environ, CUDA_VISIBLE_DEVICES=devices)
        proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=(theirs.fileno(),), cwd=self.workdir,
                                stdin=subprocess.DEVNULL, start_new_session=True, env=env)
        theirs.close()
        if self.guard is not None:
            self.guard.add(proc.pid)
        mine.setblocking(False)
        r = Runner(mine, proc, image.id if image is not None else None, devices)
        self.runners.append(r)
        self.sel.register(mine, selectors.EVENT_READ, ("runner", r))
        return r

    def _cloudpickle_only(self) -> str:
        """A directory holding only cloudpickle (what an interpreter inside an image needs from us)."""
        d = os.path.join(self.workdir, "pyshim")
        if not os.path.isdir(d):
            import cloudpickle
            os.makedirs(d, exist_ok=True)
            os.symlink(os.path.dirname(cloudpickle.__file__), os.path.join(d, "cloudpickle"))
        return d

    def run(self, tid, fid, fbytes, args, cwd, env, after=None, image=None, devices=None) -> Runner:
        """Run a task on an idle interpreter (inside `image` if given, seeing GPUs `devices`), or
        queue it on `after` (busy, same image and devices) to run after what it has; the message
        of a queued one goes at the next flush()."""
        if after is not None:
            r = after
        else:
            key = image.id if image is not None else None
            idle = [r for r in self.runners if r.tid is None and r.image == key and r.devices == devices]
            r = next((x for x in idle if fid in x.fids), None) or (idle[0] if idle else None)
            if r is None:
                if len(self.runners) >= self.max:
                    self._retire_idle()
                r = self._spawn(image, devices)
        msgs = []
        if fid not in r.fids:
            msgs.append(_frame(("fn", fid, fbytes)))
            r.fids.add(fid)
        msgs.append(_frame(("run", tid, fid, args, cwd, env)))
        if after is None or r.tid is None:
            # (an interpreter presented with a task may have returned its current one in the same
            # read that the loop is still handing to the state: it is idle, so the task starts now;
            # queued it would leave the interpreter marked busy for ever)
            r.tid = tid
        else:
            r.queued.append(tid)
        if after is not None:
            # a presented task waits behind a running one: its message goes with the others this
            # loop turn presents there, in one write (flush); if that write finds the interpreter
            # dead, its death requeues what was presented to it
            r.out.extend(msgs)
            self.pending.add(r)
        else:
            self._send_now(r, b"".join(msgs))    # an error here is this start's (StartFailed)
        return r

    def flush(self):
        """Send the messages queued for presented tasks (once per loop turn)."""
        while self.pending:
            r = self.pending.pop()
            data = b"".join(r.out)
            r.out.clear()
            try:
                _write(r.sock, data)
            except OSError:
                pass        # a dead interpreter: its socket reports the death

    def _send_now(self, r, data):
        """Write to `r` now, after anything queued for it (its messages stay in order)."""
        if r.out:
            self.pending.discard(r)
            data = b"".join(r.out) + data
            r.out.clear()
        _write(r.sock, data)

    def _retire_idle(self):
        """Make room for an interpreter of another environment: stop an idle one."""
        for r in self.runners:
            if r.tid is None:
                try:
                    self._send_now(r, _frame(("exit",)))
                except OSError:
                    pass
                self._drop(r)
                r.proc.wait()
                return

    def forget(self, fid):
        """Interpreters drop what they loaded of function `fid` (a removed library: its context's
        state goes with it); the bytes are sent again if a task calls it later."""
        for r in self.runners:
            if fid in r.fids:
                r.fids.discard(fid)
                try:
                    self._send_now(r, _frame(("forget", fid)))
                except OSError:
                    pass        # a dead interpreter: its socket reports the death

    def busy(self):
        """(runner, tid) for interpreters running a task."""
        return [(r, r.tid) for r in self.runners if r.tid is not None]

    def readable(self, r) -> list:
        """(tid, (result, stdout, wall, cpu)) for finished tasks; (tid, None) if the interpreter died."""
        try:
            data = recv_bytes(r.sock, 1 << 20)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError:
            data = b""
        if not data:
            return self._died(r)
        buf = r.buf
        buf += data
        out = []
        pos, end = 0, len(buf)
        with memoryview(buf) as view:     # messages unpickled in place: no copy of each
            while end - pos >= 4:
                (n,) = LEN.unpack_from(buf, pos)
                if end - pos < 4 + n:
                    break
                with view[pos + 4:pos + 4 + n] as body:
                    msg = pickle.loads(body)
                pos += 4 + n
                if msg[0] == "done":
                    r.tid = r.queued.popleft() if r.queued else None    # a presented task starts at once
                    out.append((msg[1], msg[2:]))
        del buf[:pos]
        return out

    def _died(self, r):
        tid = r.tid
        self._drop(r)
        code = r.proc.wait()
        self.last_death = signal_name(-code) if code < 0 else "exit code %d" % code
        return [(tid, None)] if tid is not None else []

    def _drop(self, r):
        self.pending.discard(r)
        r.out.clear()
        if r in self.runners:
            self.runners.remove(r)
        try:
            self.sel.unregister(r.sock)
        except (KeyError, ValueError):
            pass
        r.sock.close()

    def kill(self, r) -> None:
        """SIGKILL an interpreter (and what it started); its socket then reports the death."""
        try:
            os.killpg(r.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def abandon(self, r) -> None:
        """Kill an interpreter whose task nobody wants any more, and forget it now."""
        self.kill(r)
        self._drop(r)
        r.proc.wait()

    def close(self):
        for r in list(self.runners):
            if r.tid is None:
                try:
                    self._send_now(r, _frame(("exit",)))
                except OSError:
                    pass
            else:
                self.kill(r)
            self._drop(r)
            try:
                r.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self.kill(r)
                r.proc.wait()
        self.runners = []


def _frame(obj) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return LEN.pack(len(data)) + data


def _write(sock, data):
    # a task's message nearly always fits the socket's buffer: try once without blocking, and
    # pay the two mode switches (two syscalls) only for what did not fit
    try:
        n = sock.send(data)
    except (BlockingIOError, InterruptedError):
        n = 0
    if n == len(data):
        return
    sock.setblocking(True)
    try:
        sock.sendall(memoryview(data)[n:])
    finally:
        sock.setblocking(False)
