"""Command tasks: /bin/sh -c CMD as its own session (process group), watched by a pidfd.

stdout and stderr go to one pipe that the worker's loop drains, keeping the last MiB: no file
to create, read back and delete for every task.
"""
from __future__ import annotations

import os
import signal
import subprocess


def signal_name(sig: int) -> str:
    try:
        return "%s(-%d)" % (signal.Signals(sig).name, sig)
    except ValueError:
        return "signal %d" % sig


MAX_OUTPUT = 1 << 20


class CommandProcess:
    def __init__(self, cmd: str, cwd: str, env: dict, *, replace: bool = False):
        """env: variables added to the worker's environment, or with replace=True the whole of it."""
        full_env = None
        if replace:
            full_env = env
        elif env:
            full_env = dict(os.environ)
            full_env.update(env)
        rfd, wfd = os.pipe2(os.O_CLOEXEC)
        try:
            self.popen = subprocess.Popen(["/bin/sh", "-c", cmd], cwd=cwd, env=full_env, stdin=subprocess.DEVNULL,
                                          stdout=wfd, stderr=subprocess.STDOUT, start_new_session=True)
        except BaseException:
            os.close(rfd)
            raise
        finally:
            os.close(wfd)
        os.set_blocking(rfd, False)
        self.out_fd = rfd
        self.tail = bytearray()
        self.pid = self.popen.pid
        self.rusage = None        # resource usage of the shell and what it reaped, once ended
        self._fd = os.pidfd_open(self.pid)

    def fileno(self) -> int:
        return self._fd

    def drain(self) -> bool:
        """Read what the task wrote; returns False at end of output (the pipe is then closed)."""
        if self.out_fd is None:
            return False
        while True:
            try:
                b = os.read(self.out_fd, 1 << 16)
            except BlockingIOError:
                return True
            except OSError:
                b = b""
            if not b:
                os.close(self.out_fd)
                self.out_fd = None
                return False
            self.tail += b
            if len(self.tail) > 2 * MAX_OUTPUT:
                del self.tail[:-MAX_OUTPUT]

    def output(self) -> str:
        """The task's output (the last MiB), once it has ended."""
        if self.out_fd is not None:
            self.drain()                 # what is in the pipe now; a lingering child may hold it open
            if self.out_fd is not None:
                os.close(self.out_fd)
                self.out_fd = None
        return bytes(self.tail[-MAX_OUTPUT:]).decode("utf-8", "replace")

    def kill(self) -> None:
        """SIGKILL the whole process group (the shell and everything it started)."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def reap(self):
        """(exit_code, signal name or None) once the process has ended."""
        code = self.popen.returncode
        if code is None:
            try:    # wait4: the exit status and the cpu time / max RSS of the task's reaped processes
                _, status, self.rusage = os.wait4(self.pid, 0)
                code = self.popen.returncode = os.waitstatus_to_exitcode(status)
            except ChildProcessError:
                code = self.popen.wait()
        try:
            os.close(self._fd)
        except OSError:
            pass
        # the shell is gone: make sure nothing it left in its group lingers
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if code < 0:
            return 128 - code, signal_name(-code)
        return code, None


class Guardian:
    """The worker's side of guardian.py: tells it which process groups to kill if we die."""

    SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "guardian.py")

    def __init__(self, workdir=None):
        """workdir: removed by the guardian if the worker dies and nobody works there (workdir.py)."""
        import sys
        import uuid
        token = uuid.uuid4().hex
        os.environ["VINEHPC_WORKER_TOKEN"] = token    # inherited by everything this worker starts
        self.proc = subprocess.Popen([sys.executable, "-I", self.SCRIPT, token] + ([workdir] if workdir else []),
                                     stdin=subprocess.PIPE, start_new_session=True)
        self.fd = self.proc.stdin.fileno()

        self.pending = []

    def add(self, pgid):
        """A new process group; told to the guardian at the next flush() (once per loop turn).
        A worker killed before that still has the group killed: it carries the token."""
        self.pending.append(b"+%d\n" % pgid)

    def flush(self):
        if self.pending:
            data, self.pending = b"".join(self.pending), []
            try:
                os.write(self.fd, data)
            except OSError:
                pass

    def close(self):
        """Normal exit: everything is reaped already; closing stdin lets the guardian end (the
        worker removes its own directory: the guardian leaves it alone)."""
        try:
            os.write(self.fd, b"=\n")
        except OSError:
            pass
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(5)
        except Exception:
            self.proc.kill()
