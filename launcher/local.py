"""`vinehpc run`: every Manager()/Executor() of a tasks.py gets local workers.

The workers themselves are vinehpc.local.LocalWorkers (also what Manager(local_workers=N) uses).
"""
from __future__ import annotations

import os
import sys
import threading

from vinehpc import drain
from vinehpc._context import ManagerOptions
from vinehpc.local import LocalWorkers

from .progress import Progress


class LocalRun:
    """The context of `vinehpc run`: every Manager() created by the script gets local workers.

    progress: "live" (a line redrawn on the terminal), "lines" (a line every
    settings.progress_interval seconds, for logs) or None; the run's directory and an
    end-of-run summary line go to stderr whatever it is."""

    def __init__(self, workers: int, cores_per_worker: int, settings, *, progress: str | None = None,
                 tunnel: bool = False, metrics_port: int | None = None, ssl: bool = False):
        self.workers = workers
        self.ssl = ssl           # `vinehpc run --ssl` (VINEHPC_SSL): every Manager() of the script uses TLS
        self.metrics_port = metrics_port
        self.settings = settings
        self.tunnel = tunnel
        self.cores = cores_per_worker
        self.managers = {}       # manager -> LocalWorkers
        self.watchers = {}       # manager -> its drain watcher (`vinehpc drain RUN_DIR`)
        self.lock = threading.Lock()
        self.run_dirs = []
        self._stdout = None
        self.progress = Progress("vinehpc", self._counted, live=progress == "live",
                                 interval=settings.progress_interval)
        if progress:
            self.progress.start()
            if progress == "live" and sys.stdout.isatty():
                # the script's prints must not land on the progress line
                self._stdout, sys.stdout = sys.stdout, _ClearingStream(sys.stdout, self)

    def _counted(self):
        with self.lock:
            return list(self.managers)

    # context protocol (see vinehpc/_context.py)
    def manager_options(self) -> ManagerOptions:
        # (no --ssl: None, the script's Manager(ssl=...) decides: the workers start after it, with its fingerprint)
        return ManagerOptions(host="127.0.0.1", tunnel=self.tunnel or None, settings=self.settings,
                              metrics_port=self.metrics_port, ssl=True if self.ssl else None, local=True)

    def manager_started(self, manager) -> None:
        self.clear_progress()
        sys.stderr.write("vinehpc run: run directory %s\n" % manager.run_dir)
        lw = LocalWorkers(self.workers, cores=self.cores, worker_dir=self.settings.worker_dir,
                          log_dir=os.path.join(manager.run_dir, "workers"))
        lw.start("127.0.0.1:%d" % manager.port, manager.secret, manager.tls_fingerprint, unix=manager.unix_path)
        watcher = drain.Watcher(manager.run_dir, drain.ensure_key(manager.run_dir),
                                lambda grace, why: manager.drain(drain.grace_for(why, grace, self.settings.grace)))
        with self.lock:
            self.managers[manager] = lw
            self.watchers[manager] = watcher.start()
            self.run_dirs.append(manager.run_dir)

    def open_manager(self):
        """The most recent open Manager of this run (an Executor() shares it), or None."""
        with self.lock:
            ms = [m for m in self.managers if not m.closed]
        return ms[-1] if ms else None

    def manager_closed(self, manager) -> None:
        self.progress.closed(manager)
        with self.lock:
            lw = self.managers.pop(manager, None)
            watcher = self.watchers.pop(manager, None)
        if watcher is not None:
            watcher.stop()
        if lw is not None:
            lw.stop()

    def shutdown(self) -> None:
        """Close managers the script left open and make sure no worker survives."""
        for m in list(self.managers):
            try:
                m.close("vinehpc run is ending")
            except Exception:
                pass
        with self.lock:
            rest, self.managers = list(self.managers.values()), {}
        for lw in rest:
            lw.stop(timeout=2)
        self.progress.stop()
        if self._stdout is not None:
            sys.stdout = self._stdout
        if self.run_dirs:
            self.progress.summary("run directory %s" % self.run_dirs[-1])

    def clear_progress(self):
        self.progress.clear()


class _ClearingStream:
    """stdout that clears the progress line (on the same terminal) before the script writes."""

    def __init__(self, stream, run):
        self._stream, self._run = stream, run

    def write(self, s):
        self._run.clear_progress()
        return self._stream.write(s)

    def __getattr__(self, name):
        return getattr(self._stream, name)
