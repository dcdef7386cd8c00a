"""Worker processes on this machine: the one way the engine and the launchers start and stop them.

Manager(local_workers=N) and `vinehpc run` (launcher/local.py) use LocalWorkers; `vinehpc pilot`
(launcher/pilot.py) uses start_workers/stop_workers.  Here, in the engine, because the
engine never imports launcher/.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def worker_command(address: str, *, cores: int, connect_timeout: float, memory: int | None = None,
                   disk: int | None = None, image: str | None = None, reconnect: bool = True,
                   exit_on_refused: bool = False, log_dir: str | None = None, unix: str | None = None) -> list:
    """The `vinehpc worker` command line (see vinehpc/cli.py for the options)."""
    cmd = [sys.executable, "-m", "vinehpc", "worker", address, "--cores", str(cores),
           "--connect-timeout", str(connect_timeout)]
    if not reconnect:
        cmd.append("--no-reconnect")
    if exit_on_refused:
        cmd.append("--exit-on-refused")
    if memory is not None:
        cmd += ["--memory", str(memory)]
    if disk is not None:
        cmd += ["--disk", str(disk)]
    if image is not None:
        cmd += ["--image", image]
    if log_dir is not None:
        cmd += ["--log-dir", log_dir]
    if unix is not None:
        cmd += ["--unix", unix]
    return cmd


def start_workers(n: int, address: str, secret: str, *, env: dict | None = None, fingerprint: str | None = None,
                  **command) -> list:
    """Start `n` workers (worker_command(address, **command)); returns their Popen objects.

    The secret goes through the environment, never the command line (ps would show it), and so
    does `fingerprint`, the manager's TLS certificate's (protocol/tls.py; None: no TLS).  Each
    worker is in its own session: a Ctrl-C at the terminal goes to us, not to them, and
    stop_workers can signal a worker's whole process group."""
    full_env = dict(os.environ, **(env or {}), VINEHPC_SECRET=secret)
    full_env.pop("VINEHPC_TLS_FINGERPRINT", None)
    if fingerprint:
        full_env["VINEHPC_TLS_FINGERPRINT"] = fingerprint
    cmd = worker_command(address, **command)
    return [subprocess.Popen(cmd, env=full_env, stdin=subprocess.DEVNULL, start_new_session=True)
            for _ in range(n)]


def stop_workers(procs, timeout: float | None = 10.0, kill_after: float = 3.0) -> None:
    """Wait up to `timeout` seconds (None: forever) for the workers to leave (the manager told
    them to), then SIGTERM what remains, and SIGKILL what is left `kill_after` seconds later."""
    deadline = None if timeout is None else time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = [p for p in procs if p.poll() is None]
        for p in left:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
        end = time.monotonic() + kill_after
        for p in left:
            try:
                p.wait(max(0.0, end - time.monotonic()) if sig == signal.SIGTERM else None)
            except subprocess.TimeoutExpired:
                pass


def _roomy_shm(need=4 << 30) -> bool:
    """/dev/shm exists, is writable and has `need` bytes free (a local run's cache fits)."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return False
    return os.access("/dev/shm", os.W_OK) and st.f_bavail * st.f_frsize >= need


class LocalWorkers:
    """N worker processes on this machine for one manager; they leave when it closes."""

    def __init__(self, n: int, *, cores: int = 1, memory: int | None = None, disk: int | None = None,
                 worker_dir: str | None = None, log_dir: str | None = None):
        if n < 1:
            raise ValueError("number of workers must be at least 1, got %r" % n)
        if cores < 1:
            raise ValueError("cores per worker must be at least 1, got %r" % cores)
        self.n, self.cores, self.memory, self.disk = n, cores, memory, disk
        self.worker_dir = worker_dir     # Settings.worker_dir (None: /dev/shm when it has room)
        self.log_dir = log_dir           # the workers copy their logs there when they exit (RUN_DIR/workers)
        self.procs = []

    def start(self, address: str, secret: str, fingerprint: str | None = None, unix: str | None = None) -> None:
        """`fingerprint`: the manager's TLS certificate's (Manager.tls_fingerprint), None without TLS.
        `unix`: the manager's Unix socket (Manager.unix_path): the workers connect there, not to `address`."""
        env = {}
        if self.worker_dir is None and _roomy_shm():
            env["VINEHPC_WORKER_DIR"] = "/dev/shm"     # local workers: cache and sandboxes in memory
        # exit_on_refused: a worker still starting when its manager closes leaves at once, quietly,
        # instead of retrying for connect_timeout and then complaining on the user's terminal
        self.procs += start_workers(self.n, address, secret, env=env, cores=self.cores, memory=self.memory,
                                    disk=self.disk, connect_timeout=30, reconnect=False, exit_on_refused=True,
                                    log_dir=self.log_dir, fingerprint=fingerprint, unix=unix)

    def pids(self) -> list:
        return [p.pid for p in self.procs]

    def stop(self, timeout: float = 10.0) -> None:
        """Wait for the workers to leave (the manager told them to), then kill what remains."""
        stop_workers(self.procs, timeout)
