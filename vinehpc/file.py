"""Files the manager knows about: local files/directories, buffers, temps, URLs.

Each file has a *cache name*: a name derived from its content (local files, directories,
buffers), from its URL and validators (URLs), or a fresh unique id (temps).  Workers keep
files under that name, so a changed input gets a new name and is never served stale, and
an unchanged one is sent to a worker once.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import os
import stat as _stat
import threading
import uuid

CACHE_LEVELS = ("task", "workflow", "worker")
_ids = itertools.count(1)


def cache_level(cache) -> str:
    if cache is True:
        return "workflow"
    if cache is False or cache is None:
        return "task"
    if cache in CACHE_LEVELS:
        return cache
    if cache in ("forever", "always"):
        # TaskVine's "beyond the worker's life" and its older "always" (the worker's life; its
        # examples use it): a vinehpc cache ends with its worker
        return "worker"
    raise ValueError("cache must be True, False, \"forever\", \"always\" or one of %s, got %r"
                     % (", ".join(CACHE_LEVELS), cache))


class File:
    """A file as the manager sees it. Create with Manager.declare_file/buffer/temp/url."""

    kind = "file"
    peer_transfer = True     # may travel between workers (Manager.declare_file(peer_transfer=False): never)

    def __init__(self, source, cache="task"):
        self.id = next(_ids)
        self.source = source
        self.cache = cache_level(cache)
        self.producer = None   # id of the task that writes this file (set by add_output)
        self.image = None      # the image id, for an environment image (Manager.declare_image)
        self._lock = threading.Lock()
        self._memo = None      # (statkey, cachename, size)

    def __repr__(self):
        return "<%s %s %r>" % (type(self).__name__, self.id, self.source)

    # -- identity --------------------------------------------------------------------
    def exists(self) -> bool:
        return os.path.exists(self.source)

    def cachename(self) -> str:
        """Content-derived name; re-hashed only when the file's stat changed."""
        with self._lock:
            st = os.stat(self.source)
            key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            if self._memo is None or self._memo[0] != key:
                if _stat.S_ISDIR(st.st_mode):
                    digest, size = _hash_dir(self.source), 0
                    kind = "dir"
                else:
                    digest, size = _hash_file(self.source), st.st_size
                    kind = "file"
                self._memo = (key, "%s-%s" % (kind, digest), size)
            return self._memo[1]

    def is_dir(self) -> bool:
        return os.path.isdir(self.source)

    def size(self) -> int:
        self.cachename()
        return self._memo[2]

    def invalidate(self) -> None:
        with self._lock:
            self._memo = None

    # -- TaskVine's File methods ---------------------------------------------------------
    def __bool__(self):
        return True          # an empty file (len 0) is still a file

    def __len__(self):
        """Size in bytes of a manager-side file or buffer (0 for temps, URLs, directories and
        files not made yet)."""
        return self.size() if self.kind in ("file", "buffer") and self.exists() else 0

    def contents(self, unserializer=None):
        """The bytes of a manager-side file or buffer (a temp: Manager.fetch_file(temp)); with
        `unserializer` (as TaskVine's: a function of a binary file object, e.g. cloudpickle.load),
        what it returns for them."""
        if self.kind == "buffer":
            return self.data if unserializer is None else unserializer(io.BytesIO(self.data))
        if self.kind != "file":
            raise ValueError("a %s has no contents at the manager: use Manager.fetch_file(f)" % self.kind)
        with open(self.source, "rb") as f:
            return f.read() if unserializer is None else unserializer(f)


class Buffer(File):
    kind = "buffer"

    def __init__(self, data: bytes, cache="task"):
        super().__init__(None, cache)
        self.data = bytes(data)
        self._name = "buf-" + hashlib.blake2b(self.data, digest_size=16).hexdigest()

    def exists(self):
        return True

    def cachename(self):
        return self._name

    def size(self):
        return len(self.data)

    def is_dir(self):
        return False

    def __repr__(self):
        return "<Buffer %s %d bytes>" % (self.id, len(self.data))


class Temp(File):
    """Produced by a task, kept on the worker that made it."""

    kind = "temp"

    def __init__(self):
        super().__init__(None, "workflow")
        self._name = "temp-" + uuid.uuid4().hex

    def exists(self):
        return False

    def cachename(self):
        return self._name

    def is_dir(self):
        return False

    def __repr__(self):
        return "<Temp %s %s>" % (self.id, self._name)


class URL(File):
    """Fetched by the worker itself (http, https, file)."""

    kind = "url"

    def __init__(self, url: str, cache="task", validators: str = ""):
        super().__init__(url, cache)
        self._name = "url-" + hashlib.blake2b((url + "\0" + validators).encode(), digest_size=16).hexdigest()

    def exists(self):
        return True

    def cachename(self):
        return self._name

    def is_dir(self):
        return False


def url_validators(url: str, timeout: float = 5.0) -> str:
    """What identifies the content behind a URL without fetching it (ETag, Last-Modified, size).

    file:// URLs use size and mtime; http(s) a HEAD request.  When nothing can be learnt the
    URL alone names the content (documented: change the URL to force a refetch).
    """
    import urllib.parse
    import urllib.request
    u = urllib.parse.urlsplit(url)
    if u.scheme == "file":
        try:
            st = os.stat(urllib.request.url2pathname(u.path))
            return "%d:%d" % (st.st_size, st.st_mtime_ns)
        except OSError:
            return ""
    try:
        req = urllib.request.Request(url, method="HEAD")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            h = r.headers
            return "|".join(h.get(k, "") for k in ("ETag", "Last-Modified", "Content-Length"))
    except Exception:
        return ""


def _hash_file(path: str) -> str:
    # sha256: with the CPU's SHA extensions the fastest hashlib offers here (~1.1 GB/s vs 0.8 for
    # blake2b), and hashing big inputs is on the critical path of the first task that uses them
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:32]


def _hash_dir(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    for root, dirs, files in os.walk(path):
        dirs.sort()
        rel = os.path.relpath(root, path)
        for name in sorted(files):
            p = os.path.join(root, name)
            st = os.lstat(p)
            h.update(("%s/%s\0%o\0" % (rel, name, st.st_mode & 0o111)).encode())
            if _stat.S_ISLNK(st.st_mode):
                h.update(check_link(path, rel, name).encode())
            else:
                h.update(_hash_file(p).encode())
        for name in dirs:
            if os.path.islink(os.path.join(root, name)):     # (os.walk lists a link to a directory here)
                check_link(path, rel, name)
            h.update(("%s/%s/\0" % (rel, name)).encode())
    return h.hexdigest()


def check_link(top: str, rel: str, name: str) -> str:
    """The target of symbolic link rel/name inside directory input `top`, if it stays inside it.

    Workers unpack a directory with tarfile's "data" filter, which refuses a link that is
    absolute or leads out of the directory; refusing it here, when the input is declared or
    submitted, names the culprit before any worker spends a try on it."""
    target = os.readlink(os.path.join(top, rel, name))
    inside = os.path.normpath(os.path.join(rel, target))
    if os.path.isabs(target) or inside == ".." or inside.startswith("../"):
        raise ValueError("directory input %r: %s is a symbolic link to %r, outside the directory (workers "
                         "refuse it): copy the target in or make the link relative"
                         % (top, os.path.normpath(os.path.join(rel, name)), target))
    return target
