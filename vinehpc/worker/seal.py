"""Cache entries every task reads: read-only, and checked after every task that had them.

A task runs as the worker's user, so no permission bit stops it (`chmod u+w` undoes read-only),
and a hardlinked or bind "copy" shares the bytes.  What a task cannot forge is a file's ctime:
any write, chmod, utime, rename or link sets it to the current time, and only root sets it
back.  So an entry is *sealed* before its first task gets it (made read-only, its lstat
signature -- inode, mode, size, mtime, ctime of every file and directory in it -- recorded), and
*checked* after each task that had it: a different signature is a modified entry.  The check
costs one lstat per file of the task's inputs, no read of their bytes.

One hole remains: ctime has the granularity of the kernel's clock tick (1-10 ms, unless the
file system keeps fine-grained times), so a write in the very tick the entry was sealed could
keep the ctime.  A task that starts within that tick (`racy`) therefore gets the entry only
after either a digest of its bytes was taken (entries up to DIGEST_MAX: the check then also
compares the bytes) or the clock has moved past that tick (larger entries: a wait of at most a
tick, once per entry).
"""
from __future__ import annotations

import hashlib
import os
import stat
import time

DIGEST_MAX = 1 << 20        # bytes of an entry still cheaper to hash than to wait a clock tick for
TICK_WAIT = 0.05            # longest wait for the coarse clock to move (it moves every 1-10 ms)
_COARSE = getattr(time, "CLOCK_REALTIME_COARSE", 5)   # Linux's; file times are taken from it


class Seal:
    __slots__ = ("sig", "newest", "size", "digest", "users", "shared", "root_ino")

    def __init__(self, sig, newest, size):
        self.sig, self.newest, self.size = sig, newest, size
        self.digest = None      # the bytes' digest, while the entry is racy
        self.users = 0          # started tasks that have it now
        self.shared = False     # two had it at once since the last good check: who wrote it is unknown
        self.root_ino = None    # an image's: its root's inode (replaced by a new unpack)


def _walk(path):
    """(relative name, lstat) of path and everything under it, in a stable order."""
    st = os.lstat(path)
    yield "", st
    if stat.S_ISDIR(st.st_mode):
        for d, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(dirs + files):
                q = os.path.join(d, name)
                yield os.path.relpath(q, path), os.lstat(q)


def signature(path):
    """(digest of every lstat that a write changes, newest ctime, total bytes of its files)."""
    h = hashlib.blake2b(digest_size=20)
    newest = size = 0
    for rel, st in _walk(path):
        h.update(b"%s\0%d %d %d %d %d %d\n" % (rel.encode("utf-8", "surrogateescape"), st.st_ino, st.st_mode,
                                                st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_nlink))
        newest = max(newest, st.st_ctime_ns)
        if stat.S_ISREG(st.st_mode):
            size += st.st_size
    return h.digest(), newest, size


def content_digest(path) -> bytes:
    h = hashlib.blake2b(digest_size=20)
    for rel, st in _walk(path):
        h.update(rel.encode("utf-8", "surrogateescape") + b"\0")
        if stat.S_ISREG(st.st_mode):
            with open(os.path.join(path, rel) if rel else path, "rb") as f:
                while True:
                    b = f.read(1 << 20)
                    if not b:
                        break
                    h.update(b)
        elif stat.S_ISLNK(st.st_mode):
            h.update(os.readlink(os.path.join(path, rel)).encode("utf-8", "surrogateescape"))
    return h.digest()


def make_read_only(path) -> None:
    """Files lose their write bits (execute bits stay: an input may be a program), directories
    become 0555 (nothing added or removed); only what needs it is changed."""
    for rel, st in _walk(path):
        if stat.S_ISLNK(st.st_mode):
            continue
        want = 0o555 if stat.S_ISDIR(st.st_mode) else stat.S_IMODE(st.st_mode) & ~0o222
        if stat.S_IMODE(st.st_mode) != want:
            os.chmod(os.path.join(path, rel) if rel else path, want)


def seal(path) -> Seal:
    make_read_only(path)
    return Seal(*signature(path))


def racy(s: Seal) -> bool:
    """Could a write now keep the ctime recorded (same clock tick)?"""
    return time.clock_gettime_ns(_COARSE) <= s.newest


def settle(s: Seal, path) -> None:
    """Before a task gets the entry: make sure a write by it will show (see the module doc)."""
    if s.digest is not None or not racy(s):
        return
    if s.size <= DIGEST_MAX:
        s.digest = content_digest(path)
        return
    deadline = time.monotonic() + TICK_WAIT
    while racy(s) and time.monotonic() < deadline:
        time.sleep(0.001)


def intact(s: Seal, path) -> bool:
    """Unchanged since sealed?  (A digest taken while racy is compared too, then dropped once the
    clock has moved on: from then on a write changes the ctime.)"""
    try:
        if signature(path)[0] != s.sig:
            return False
        if s.digest is not None:
            if content_digest(path) != s.digest:
                return False
            if not racy(s):
                s.digest = None
        return True
    except OSError:
        return False
