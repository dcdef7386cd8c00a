"""Local workers: `vinehpc run`, Manager(local_workers=N) and Executor() on one machine."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

from vinehpc import config, drain


class LocalWorkers:
    """N worker processes on this machine, each in its own session (Ctrl-C goes to us, not them)."""

    def __init__(self, n: int, *, cores: int = 1, memory: int | None = None, disk: int | None = None):
        if n < 1:
            raise ValueError("number of workers must be at least 1, got %r" % n)
        if cores < 1:
            raise ValueError("cores per worker must be at least 1, got %r" % cores)
        self.n, self.cores, self.memory, self.disk = n, cores, memory, disk
        self.procs = []

    def start(self, address: str, secret: str) -> None:
        env = dict(os.environ, VINEHPC_SECRET=secret)
        if "VINEHPC_WORKER_DIR" not in env and _roomy_shm():
            env["VINEHPC_WORKER_DIR"] = "/dev/shm"     # local workers: cache and sandboxes in memory
        for _ in range(self.n):
            cmd = [sys.executable, "-m", "vinehpc", "worker", address, "--cores", str(self.cores),
                   "--connect-timeout", "30", "--no-reconnect"]
            if self.memory is not None:
                cmd += ["--memory", str(self.memory)]
            if self.disk is not None:
                cmd += ["--disk", str(self.disk)]
            self.procs.append(subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, start_new_session=True))

    def pids(self) -> list:
        return [p.pid for p in self.procs]

    def stop(self, timeout: float = 10.0) -> None:
        """Wait for the workers to leave (the manager told them to), then kill what remains."""
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(3)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def _roomy_shm(need=4 << 30) -> bool:
    """/dev/shm exists, is writable and has `need` bytes free (a local run's cache fits)."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return False
    return os.access("/dev/shm", os.W_OK) and st.f_bavail * st.f_frsize >= need


class LocalRun:
    """The context of `vinehpc run`: every Manager() created by the script gets local workers."""

    def __init__(self, workers: int, cores_per_worker: int = 1, *, progress: bool = False, tunnel: bool = False):
        self.workers = workers
        self.tunnel = tunnel
        self.cores = cores_per_worker
        self.managers = {}       # manager -> LocalWorkers
        self.watchers = {}       # manager -> its drain watcher (`vinehpc drain RUN_DIR`)
        self.lock = threading.Lock()
        self._progress = None
        self._stop = threading.Event()
        self._shown = False
        self._stdout = None
        if progress:
            self._progress = threading.Thread(target=self._show_progress, daemon=True, name="vinehpc-progress")
            self._progress.start()
            if sys.stdout.isatty():
                # the script's prints must not land on the progress line
                self._stdout, sys.stdout = sys.stdout, _ClearingStream(sys.stdout, self)

    # context protocol (see vinehpc/_context.py)
    def manager_options(self) -> dict:
        return {"host": "127.0.0.1", "tunnel": self.tunnel or None}

    def manager_started(self, manager) -> None:
        lw = LocalWorkers(self.workers, cores=self.cores)
        lw.start("127.0.0.1:%d" % manager.port, manager.secret)
        watcher = drain.Watcher(manager.run_dir, drain.ensure_key(manager.run_dir),
                                lambda grace, why: manager.drain(drain.grace_for(why, grace, config.grace())))
        with self.lock:
            self.managers[manager] = lw
            self.watchers[manager] = watcher.start()

    def open_manager(self):
        """The most recent open Manager of this run (an Executor() shares it), or None."""
        with self.lock:
            ms = [m for m in self.managers if not m._closed]
        return ms[-1] if ms else None

    def manager_closed(self, manager) -> None:
        with self.lock:
            lw = self.managers.pop(manager, None)
            watcher = self.watchers.pop(manager, None)
        if watcher is not None:
            watcher.stop()
        if lw is not None:
            lw.stop()

    def shutdown(self) -> None:
        """Close managers the script left open and make sure no worker survives."""
        self._stop.set()
        for m in list(self.managers):
            try:
                m.close("vinehpc run is ending")
            except Exception:
                pass
        with self.lock:
            rest, self.managers = list(self.managers.values()), {}
        for lw in rest:
            lw.stop(timeout=2)
        if self._progress is not None:
            self._progress.join(2)
            self.clear_progress()
            if self._stdout is not None:
                sys.stdout = self._stdout

    def clear_progress(self):
        if self._shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
            self._shown = False

    def _show_progress(self):
        last = ""
        t0, done0 = time.monotonic(), None
        while not self._stop.wait(0.5):
            with self.lock:
                ms = list(self.managers)
            if not ms:
                continue
            tot = {"done": 0, "failed": 0, "running": 0, "waiting": 0, "workers": 0}
            for m in ms:
                try:
                    s = m.core.stats()
                except Exception:
                    continue
                for k in tot:
                    tot[k] += s.get(k, 0)
            if done0 is None:
                t0, done0 = time.monotonic(), tot["done"] + tot["failed"]
            rate = (tot["done"] + tot["failed"] - done0) / max(1e-9, time.monotonic() - t0)
            line = ("vinehpc: {done:,} done, {running:,} running, {waiting:,} waiting, {failed:,} failed | "
                    "{workers} workers").format(**tot) + (" | %.0f tasks/s" % rate if rate else "")
            if line != last or not self._shown:
                sys.stderr.write("\r\033[K" + line)
                sys.stderr.flush()
                self._shown = True
                last = line


class _ClearingStream:
    """stdout that clears the progress line (on the same terminal) before the script writes."""

    def __init__(self, stream, run):
        self._stream, self._run = stream, run

    def write(self, s):
        self._run.clear_progress()
        return self._stream.write(s)

    def __getattr__(self, name):
        return getattr(self._stream, name)
