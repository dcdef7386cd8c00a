"""The worker's log file: written in its work directory (node-local, no shared-filesystem traffic
while it runs), copied at exit into a collection folder if it has one (a pilot's and a local
run's workers: RUN_DIR/workers/HOST-PID.log), since a node-local disk vanishes with the allocation.

Lines start with a UTC time (`2026-12-05T21:30:00.123Z INFO ...`): `vinehpc logs` matches them
with the journal's times to show what a worker logged around a task.
"""
from __future__ import annotations

import logging
import os
import shutil
import time

NAME = "worker.log"


class _UTC(logging.Formatter):
    converter = time.gmtime

    def formatTime(self, record, datefmt=None):
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + ".%03dZ" % record.msecs


class WorkerLog:
    """INFO and above of the `vinehpc` loggers, to WORKDIR/worker.log, for this worker's life."""

    def __init__(self, workdir: str, collect_dir: str | None, name: str):
        self.path = os.path.join(workdir, NAME)
        self.collect_dir, self.name = collect_dir, name
        self.handler = logging.FileHandler(self.path)
        self.handler.setLevel(logging.INFO)
        self.handler.setFormatter(_UTC("%(asctime)s %(levelname)s %(message)s"))
        self.logger = logging.getLogger("vinehpc")
        self.logger.addHandler(self.handler)
        if self.logger.getEffectiveLevel() > logging.INFO:
            self.logger.setLevel(logging.INFO)      # the file gets INFO; stderr handlers keep their own level

    def close(self) -> str | None:
        """Stop writing; copy the log into the collection folder. Returns where it is then."""
        self.logger.removeHandler(self.handler)
        self.handler.close()
        if not self.collect_dir:
            return self.path
        dest = os.path.join(self.collect_dir, self.name + ".log")
        try:
            # the run directory is its user's alone (vinehpc/private.py): the folder 0700, the copy 0600
            os.makedirs(self.collect_dir, mode=0o700, exist_ok=True)
            fd = os.open(dest + ".part", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as out, open(self.path, "rb") as src:
                shutil.copyfileobj(src, out)
            os.replace(dest + ".part", dest)
        except OSError as e:
            logging.getLogger("vinehpc.worker").warning("cannot copy the worker's log to %s: %s", dest, e)
            return self.path
        return dest
