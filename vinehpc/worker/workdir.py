"""A worker's own work directory (cache, sandboxes, log) and what is left when a worker dies.

A worker that made its directory removes it when it exits; one killed with -9 (the OOM killer)
cannot.  So the directory is *claimed*: a lock (flock) on its `.owner` file is held for the
worker's life.  The kernel drops the lock however the process ends, in any pid namespace that
shares the file system, so "unlocked" means "nobody works here" -- no pid to compare, no pid
reuse to fear.  Such an abandoned directory is emptied by the worker's guardian when the worker
dies (guardian.py), and by the next worker started on the node (`remove_stale`), for the ones
whose guardian died too.  Its log stays: the journal names it as the killed worker's log
(`vinehpc logs`), and it is small next to the cache and sandboxes; a directory left with
nothing but a log older than LOG_DAYS is removed whole.
"""
from __future__ import annotations

import fcntl
import os
import tempfile
import time

from ..comm.receive import remove_path

PREFIX = "vinehpc-worker-"
OWNER = ".owner"
MIN_AGE = 10.0      # seconds: a directory younger than this may be one a worker has made and not yet claimed
LOG = "worker.log"  # kept (logfile.py writes it; the journal points at it)
LOG_DAYS = 1.0


def make(parent=None):
    """A new work directory under parent (None: the temporary directory), claimed: (path, the
    open lock file, to be kept open for the worker's life)."""
    path = tempfile.mkdtemp(prefix=PREFIX, dir=parent)
    f = open(os.path.join(path, OWNER), "w")
    fcntl.flock(f, fcntl.LOCK_EX)
    f.write("%d\n" % os.getpid())
    f.flush()
    return path, f


def abandoned(path) -> bool:
    """Claimed once, and its owner is gone (its lock is free)."""
    try:
        fd = os.open(os.path.join(path, OWNER), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False          # never claimed (made by hand, or an older vinehpc): not ours to judge
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def remove_if_abandoned(path) -> bool:
    """Empty an abandoned directory but for its log (and its claim, so it is judged again
    later); remove it whole once the log is older than LOG_DAYS.  False: someone works there."""
    if not abandoned(path):
        return False
    for e in os.scandir(path):
        if e.name not in (LOG, OWNER):
            remove_path(e.path)
    try:
        old = time.time() - os.stat(os.path.join(path, LOG)).st_mtime > LOG_DAYS * 86400
    except FileNotFoundError:
        old = True
    if old:
        remove_path(path)
    return True


def remove_stale(parent=None) -> list:
    """Empty (or remove) the abandoned work directories of this user under parent; returns their paths."""
    parent = parent or tempfile.gettempdir()
    gone, now, uid = [], time.time(), os.getuid()
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return gone
    for e in entries:
        try:
            if (not e.name.startswith(PREFIX) or not e.is_dir(follow_symlinks=False)
                    or e.stat(follow_symlinks=False).st_uid != uid
                    or now - e.stat(follow_symlinks=False).st_mtime < MIN_AGE):
                continue
        except OSError:
            continue
        if remove_if_abandoned(e.path):
            gone.append(e.path)
    return gone
