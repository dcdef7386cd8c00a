"""Command tasks: /bin/sh -c CMD as its own session (process group), watched by a pidfd."""
from __future__ import annotations

import os
import signal
import subprocess


def signal_name(sig: int) -> str:
    try:
        return "%s(-%d)" % (signal.Signals(sig).name, sig)
    except ValueError:
        return "signal %d" % sig


class CommandProcess:
    def __init__(self, cmd: str, cwd: str, env: dict, stdout_path: str):
        full_env = None
        if env:
            full_env = dict(os.environ)
            full_env.update(env)
        with open(stdout_path, "wb") as out:
            self.popen = subprocess.Popen(["/bin/sh", "-c", cmd], cwd=cwd, env=full_env, stdin=subprocess.DEVNULL,
                                          stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.popen.pid
        self._fd = os.pidfd_open(self.pid)

    def fileno(self) -> int:
        return self._fd

    def kill(self) -> None:
        """SIGKILL the whole process group (the shell and everything it started)."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def reap(self):
        """(exit_code, signal name or None) once the process has ended."""
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
