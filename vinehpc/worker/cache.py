"""The worker's content-addressed file cache: cache_dir/<cachename>.

Entries arrive by chunks from the manager (put), by fetching a URL, or as a task's temp
output.  A name is derived from content, so an entry is never stale; "task"-level entries
are removed when no task uses them any more.
"""
from __future__ import annotations

import os
import shutil
import tarfile
import urllib.parse
import urllib.request

ORDER = {"task": 0, "workflow": 1, "worker": 2}
SAFE = set("abcdefghijklmnopqrstuvwxyz0123456789-_.")


def check_cachename(n) -> str:
    if not isinstance(n, str) or not n or len(n) > 200 or n.startswith(".") or not set(n) <= SAFE:
        raise ValueError("bad cache name %r" % (n,))
    return n


class Cache:
    def __init__(self, root: str):
        self.root = root
        os.makedirs(root, exist_ok=True)
        self.entries = {}      # cachename -> level ("task"/"workflow"/"worker")
        self.refs = {}         # cachename -> running/queued tasks using it
        self.parts = {}        # cachename -> open part file (put in progress)
        for n in os.listdir(root):
            if n.startswith("."):
                _rm(os.path.join(root, n))
            else:
                self.entries[n] = "worker"

    def path(self, n: str) -> str:
        return os.path.join(self.root, check_cachename(n))

    def has(self, n: str) -> bool:
        return n in self.entries

    # -- arrivals ---------------------------------------------------------------------
    def put_chunk(self, n: str, data: bytes, last: bool, kind: str, level: str = "workflow", mode: int = 0o444) -> bool:
        """Write one chunk; returns True when the entry is complete."""
        check_cachename(n)
        if n in self.entries and n not in self.parts:
            return last  # already have it (a task-level file sent again): drop the bytes
        f = self.parts.get(n)
        if f is None:
            f = self.parts[n] = open(os.path.join(self.root, ".part-" + n), "wb")
        f.write(data)
        if not last:
            return False
        del self.parts[n]
        f.close()
        part = f.name
        if kind == "tar":
            d = part + ".d"
            os.makedirs(d)
            with tarfile.open(part) as tar:
                tar.extractall(d, filter="data")
            os.unlink(part)
            part = d
        else:
            # read-only, keeping the source's execute bits (an input may be a program)
            os.chmod(part, 0o444 | (int(mode) & 0o111))
        os.replace(part, os.path.join(self.root, n))
        self.entries[n] = level if level in ORDER else "workflow"
        return True

    def abort_part(self, n: str) -> None:
        f = self.parts.pop(n, None)
        if f is not None:
            f.close()
            _rm(f.name)
        _rm(os.path.join(self.root, ".part-" + n) + ".d")

    def adopt(self, n: str, src: str, level: str = "workflow") -> None:
        """Move a task's temp output into the cache."""
        dst = self.path(n)
        if os.path.isdir(dst):
            shutil.rmtree(dst)
        os.replace(src, dst)
        self.entries[n] = level

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
        os.replace(part, os.path.join(self.root, n))

    def raise_level(self, n: str, level: str) -> None:
        """The strongest level any user of an entry asked for wins."""
        cur = self.entries.get(n)
        if cur is not None and ORDER.get(level, 0) > ORDER[cur]:
            self.entries[n] = level

    # -- use --------------------------------------------------------------------------
    def ref(self, n: str) -> None:
        self.refs[n] = self.refs.get(n, 0) + 1

    def unref(self, n: str, level: str) -> None:
        k = self.refs.get(n, 0) - 1
        if k > 0:
            self.refs[n] = k
            return
        self.refs.pop(n, None)
        if level == "task" and self.entries.get(n) == "task":
            self.remove(n)

    def remove(self, n: str) -> None:
        if self.refs.get(n):
            return
        self.entries.pop(n, None)
        _rm(os.path.join(self.root, n))

    def end_of_workflow(self) -> None:
        """The manager is gone: keep only worker-level entries."""
        for f in self.parts.values():
            f.close()
            _rm(f.name)
        self.parts.clear()
        for n, level in list(self.entries.items()):
            if level != "worker":
                self.remove(n)


def _rm(p):
    try:
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            os.unlink(p)
    except FileNotFoundError:
        pass
