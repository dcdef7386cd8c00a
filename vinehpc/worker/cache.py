"""The worker's content-addressed file cache on disk: cache_dir/<cachename>.

Entries arrive by chunks from the manager (put), by fetching a URL, or as a task's temp
output.  A name is derived from content, so an entry is never stale.  Which entries exist,
at which level, who uses them and when one goes: the worker's state machine (state.py)
decides; this module only does the file work.

Entries are read-only and checked after every task that had them (seal.py): `take` before a
task gets one, `give_back` when it ends; a modified entry is removed and reported.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import stat
import urllib.parse
import urllib.request

from ..comm import peer
from ..comm.receive import Incoming, remove_path
from . import seal
from .events import check_cachename


class Cache:
    def __init__(self, root: str):
        self.root = root
        os.makedirs(root, exist_ok=True)
        # cachename -> level: what a previous run left is worker-level; from here on the dict
        # is the state machine's inventory (WorkerState.files), kept there
        self.entries = {}
        self.parts = {}        # cachename -> Incoming (a put in progress)
        self.seals = {}        # cachename -> seal.Seal, from its first task on
        # plain files on their way here (a put, a fetch from a peer): served to peers as they grow
        self.arriving = peer.Arrivals()
        for n in os.listdir(root):
            if n.startswith("."):
                remove_path(os.path.join(root, n))
            else:
                self.entries[n] = "worker"

    def path(self, n: str) -> str:
        return os.path.join(self.root, check_cachename(n))

    def put_chunk(self, n: str, data: bytes, last: bool, kind: str, mode: int = 0o444, size: int = 0) -> bool:
        """Write one chunk; True when this put stored the entry (raises OSError, tarfile.TarError
        at the last chunk if it could not be stored: nothing stays behind)."""
        check_cachename(n)
        if n in self.entries and n not in self.parts:
            return False   # already have it (a task-level file sent again): drop the bytes
        inc = self.parts.get(n)
        if inc is None:
            # read-only, keeping the source's execute bits (an input may be a program)
            inc = self.parts[n] = Incoming(os.path.join(self.root, n), os.path.join(self.root, ".part-" + n),
                                           tar=kind == "tar", mode=0o444 | (int(mode) & 0o111))
            if kind == "file" and inc.error is None:
                self.arriving.begin(n, inc.part, size)
        inc.write(data)
        arrival = self.arriving.get(n)
        if arrival is not None:
            if inc.error is None:
                arrival.wrote(len(data))
            else:
                arrival.fail()
        if not last:
            return False
        del self.parts[n]
        self.seals.pop(n, None)
        try:
            if arrival is not None and inc.error is None:
                arrival.move(inc.dest, inc.finish)    # stays listed until the worker's inventory has it (settle)
            else:
                inc.finish()
        except BaseException:
            inc.abort()
            if arrival is not None:
                arrival.fail()
                self.arriving.settle(n)
            raise
        return True

    def abort_parts(self) -> None:
        """The manager is gone: drop the puts it did not finish."""
        for n, inc in self.parts.items():
            inc.abort()
            arrival = self.arriving.settle(n)
            if arrival is not None:
                arrival.fail()
        self.parts.clear()

    def adopt(self, n: str, src: str) -> None:
        """Move a task's temp output into the cache."""
        dst = self.path(n)
        self.seals.pop(n, None)
        if os.path.isdir(dst):
            remove_path(dst)
        os.replace(src, dst)

    def fetch_url(self, n: str, url: str, timeout: float = 300.0) -> None:
        """Download url into the cache (called on a helper thread)."""
        part = os.path.join(self.root, ".url-" + check_cachename(n))
        u = urllib.parse.urlsplit(url)
        if u.scheme == "file":
            shutil.copyfile(urllib.request.url2pathname(u.path), part)
        elif u.scheme in ("http", "https"):
            with urllib.request.urlopen(url, timeout=timeout) as r, open(part, "wb") as f:
                shutil.copyfileobj(r, f, 1 << 20)
        else:
            raise ValueError("cannot fetch %r: only http, https and file URLs" % url)
        os.chmod(part, 0o555)      # executable, as in TaskVine: a URL may be the `./script.sh` a task runs
        os.replace(part, os.path.join(self.root, n))

    def fetch_peer(self, n: str, host: str, port: int, secret: str, size: int, digest, stall: float) -> int:
        """Get n from another worker into the cache (a helper thread); the bytes received.
        Raises comm.peer.TransferError: nothing stays behind."""
        part, dst = self.peer_part(n), self.path(n)
        got = peer.fetch(host, port, secret, n, part, size, digest, stall, self.arriving)
        os.chmod(part, 0o555)      # as a URL's: the source's mode bits do not travel, an input may be a program
        self.arriving.get(n).move(dst, lambda: os.replace(part, dst))   # settled by the loop (its inventory first)
        return got

    def peer_part(self, n: str) -> str:
        """Where a fetch from a peer writes n until it is complete (served to others meanwhile)."""
        return os.path.join(self.root, ".peer-" + check_cachename(n))

    def sums(self, names) -> dict:
        """{name: [size, "sha256:HEX"]} of the entries that are plain files (a task's temp outputs,
        measured once as they are kept: a peer's copy is checked against it, never against what
        the serving worker's disk holds later).  Hashing costs ~1 ms per MB, on the worker's loop."""
        out = {}
        for n in names:
            try:
                with open(self.path(n), "rb") as f:
                    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                        continue
                    out[n] = [os.fstat(f.fileno()).st_size, "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()[:32]]
            except OSError:
                continue
        return out

    def remove(self, n: str) -> None:
        self.seals.pop(n, None)
        remove_path(self.path(n))

    # ---------------------------------------------------------------- inputs tasks may write to
    def take(self, n: str):
        """A task is about to get entry n: (its seal, to give back, None), or (None, why it cannot:
        the entry was modified since the last task that had it ended -- by a process that task
        left, a thread in an interpreter)."""
        path = self.path(n)
        s = self.seals.get(n)
        if s is None:
            s = self.seals[n] = seal.seal(path)
        elif s.users == 0 and not seal.intact(s, path):
            return None, "input %s was modified on this worker after the task that had it ended" % n
        seal.settle(s, path)
        s.users += 1
        s.shared = s.shared or s.users > 1
        return s, None

    def give_back(self, n: str, s):
        """A task that had entry n (sealed as `s`) ended: None if the entry is intact, else (the
        task alone had it since the last check, why) -- the caller drops the entry."""
        if self.seals.get(n) is not s:
            return None            # removed, or replaced by a copy sent again, meanwhile
        s.users -= 1
        if seal.intact(s, self.path(n)):
            if s.users == 0:
                s.shared = False
            return None
        return not s.shared, "input %s was modified on this worker%s" % (
            n, "" if not s.shared else " while tasks ran beside the one that had it")
