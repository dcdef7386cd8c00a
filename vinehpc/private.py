"""A run directory is its user's alone, whatever the umask: the directory 0700, the files that
vinehpc keeps in it 0600.  A resume store (the journal and the results, which are unpickled on
resubmission) that others can write is never trusted.

Why: under umask 002 a group member could append a "completed" record to the journal and a
pickle to the results, and the next resubmission would run their code as the job's owner;
under 022 every task's results and outputs were world-readable.
"""
from __future__ import annotations

import os
import stat


class UnsafeStore(PermissionError):
    """A resume store that someone else could have written: not read."""


def make_private(path: str) -> str:
    """Create directory `path` (and its parents) if missing; make it 0700 (owner only)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    if stat.S_IMODE(os.stat(path).st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def private_fd(path: str) -> int:
    """A descriptor appending to `path`, created 0600; an existing file is made 0600 too."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != 0o600:
            os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_private(path: str, mode: str = "a", **kw):
    """Open `path` for appending, created 0600; an existing file is made 0600 too."""
    fd = private_fd(path)
    try:
        return os.fdopen(fd, mode, **kw)
    except BaseException:
        os.close(fd)
        raise


def check_store(run_dir: str, names) -> None:
    """Refuse (UnsafeStore) to resume from `run_dir` if one of its store files `names` that exists
    is not a regular file of ours that only we can write.  (A file another user made there, or
    one the group could write, may hold anything, and resuming unpickles it.)"""
    me = os.getuid()
    for name in names:
        path = os.path.join(run_dir, name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        why = None
        if not stat.S_ISREG(st.st_mode):
            why = "is not a regular file"
        elif st.st_uid != me:
            why = "belongs to another user (uid %d)" % st.st_uid
        elif st.st_mode & 0o022:
            why = "is writable by %s (mode %o)" % ("group and others" if st.st_mode & 0o022 == 0o022 else
                                                   "its group" if st.st_mode & 0o020 else "others",
                                                   stat.S_IMODE(st.st_mode))
        if why:
            raise UnsafeStore(
                "refusing to resume from %s: %s %s, so someone else may have changed it, and resuming runs "
                "what it records (results are unpickled). If you trust its contents: chmod 700 %s; chmod 600 %s/*  "
                "and run again; otherwise start afresh with another run directory." % (run_dir, path, why, run_dir,
                                                                                     run_dir))
