"""`vinehpc run`: every Manager()/Executor() of a tasks.py gets local workers.

The workers themselves are vinehpc.local.LocalWorkers (also what Manager(local_workers=N) uses).
"""
from __future__ import annotations

import sys
import threading
import time

from vinehpc import drain
from vinehpc._context import ManagerOptions
from vinehpc.local import LocalWorkers


class LocalRun:
    """The context of `vinehpc run`: every Manager() created by the script gets local workers."""

    def __init__(self, workers: int, cores_per_worker: int, settings, *, progress: bool = False,
                 tunnel: bool = False, metrics_port: int | None = None):
        self.workers = workers
        self.metrics_port = metrics_port
        self.settings = settings
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
    def manager_options(self) -> ManagerOptions:
        return ManagerOptions(host="127.0.0.1", tunnel=self.tunnel or None, settings=self.settings,
                              metrics_port=self.metrics_port)

    def manager_started(self, manager) -> None:
        lw = LocalWorkers(self.workers, cores=self.cores, worker_dir=self.settings.worker_dir)
        lw.start("127.0.0.1:%d" % manager.port, manager.secret)
        watcher = drain.Watcher(manager.run_dir, drain.ensure_key(manager.run_dir),
                                lambda grace, why: manager.drain(drain.grace_for(why, grace, self.settings.grace)))
        with self.lock:
            self.managers[manager] = lw
            self.watchers[manager] = watcher.start()

    def open_manager(self):
        """The most recent open Manager of this run (an Executor() shares it), or None."""
        with self.lock:
            ms = [m for m in self.managers if not m.closed]
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
                    s = m.stats
                except Exception:      # closing, or its I/O thread is busy: the next turn shows it
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
