"""A worker's own work directory (cache, sandboxes, log) and what is left when a worker dies.

A worker that made its directory removes it when it exits; one killed with -9 (the OOM killer)
cannot.  So the directory is *claimed*: a lock (flock) on its `.owner` file is held for the
worker's life.  The kernel drops the lock however the process ends, in any pid namespace that
shares the file system, so "unlocked" means "nobody works here" -- no pid to compare, no pid
reuse to fear.  Such an abandoned directory is removed by the worker's guardian when the worker
dies (guardian.py), and by the next worker started on the node (`remove_stale`), for the ones
whose guardian died too.
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
    if abandoned(path):
        remove_path(path)
        return True
    return False


def remove_stale(parent=None) -> list:
    """Remove the abandoned work directories of this user under parent; returns their paths."""
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
