"""Node-local deployment: unpack an image (or vinehpc.pyz's payload) once per node.

Layout of the cache (`cache_root()`, on node-local disk):

    <local>/vinehpc-images-<uid>/            mode 0700, must be ours (see cache_root)
        <key>/                               a complete tree; it appears only by rename(2) of a
                                             fully unpacked and verified temporary directory
        .tmp-<key>-XXXXXX/                   a tree being unpacked (removed on failure)
        <key>.lock                           flock(2): held by the process unpacking <key>
        unpack.log                           one JSON line per unpack (key, pid, host, seconds)

Any number of processes may ask for the same key at once: the first takes the lock and
unpacks, the others block on the lock (with a deadline) and then find the tree in place.
The lock is released by the kernel when its holder dies, and the next process removes the
dead one's temporary directory, so a killed unpack costs a retry, never a half tree in use.
The fast path for an image already here is one read of the image's header and one stat.

Standard library + zstandard (for .vimg payloads) only: workers import this from images.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import stat as _stat
import sys
import time

from . import config
from .image import ImageError, Manifest, _check_name, extract, read_manifest

LOG = "unpack.log"


class DeployError(ImageError):
    """The node-local cache cannot be used (permissions, disk full, lock timeout)."""


def cache_root(local_dir=None) -> str:
    """<local_dir or config.local_dir()>/vinehpc-images-<uid>, created if needed.

    Per user, 0700 and checked to be ours: in a shared /tmp, another user could otherwise
    create the directory we are about to import code from."""
    base = os.path.abspath(local_dir or config.local_dir())
    root = os.path.join(base, "vinehpc-images-%d" % os.getuid())
    try:
        os.makedirs(root, 0o700, exist_ok=True)
        st = os.lstat(root)
    except OSError as e:
        raise DeployError("cannot create the node-local image cache %s: %s (set VINEHPC_LOCAL_DIR to a "
                          "writable directory on the node's local disk)" % (root, e.strerror or e)) from None
    if not _stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise DeployError("refusing to use %s: it must be a directory owned by you and writable only by you "
                          "(set VINEHPC_LOCAL_DIR elsewhere)" % root)
    return root


def ensure_unpacked(key: str, populate, *, what: str, local_dir=None, timeout=None) -> str:
    """The path of <cache_root>/<key>, made by `populate(tmpdir)` if it does not exist yet.

    `populate` fills an empty directory and raises on any problem; it runs in exactly one
    process per node and key at a time, and its result is used only if it returned."""
    root = cache_root(local_dir)
    final = os.path.join(root, key)
    if os.path.isdir(final):
        return final
    import socket             # the slow path only: an image already here needs none of these
    import tempfile
    lockpath = final + ".lock"
    try:
        fd = os.open(lockpath, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise DeployError("cannot create the lock %s: %s" % (lockpath, e.strerror or e)) from None
    try:
        _lock(fd, lockpath, timeout if timeout is not None else config.unpack_timeout(), what)
        if os.path.isdir(final):
            return final            # another process unpacked it while we waited
        _remove_stale(root, key)
        t0 = time.monotonic()
        try:
            tmp = tempfile.mkdtemp(prefix=".tmp-%s-" % key, dir=root)
        except OSError as e:
            raise DeployError("cannot unpack %s into %s: %s" % (what, root, e.strerror or e)) from None
        try:
            try:
                populate(tmp)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise DeployError("cannot unpack %s into %s: no space left (set VINEHPC_LOCAL_DIR to a "
                                      "larger local disk)" % (what, root)) from None
                raise DeployError("cannot unpack %s into %s: %s" % (what, root, e)) from None
            _read_only(tmp)          # files are already: no task may add, remove or rename either
            os.rename(tmp, final)
        except BaseException:
            _rmtree(tmp)
            raise
        _log(root, {"key": key, "what": what, "pid": os.getpid(), "host": socket.gethostname(),
                    "time": time.time(), "seconds": round(time.monotonic() - t0, 3)})
        return final
    finally:
        os.close(fd)                # releases the lock


def _lock(fd, lockpath, timeout, what):
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            pass
        if time.monotonic() > deadline:
            try:
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "?"
            except OSError:
                holder = "?"
            raise DeployError("timed out after %.0f s waiting for another process (%s) to unpack %s; "
                              "set VINEHPC_UNPACK_TIMEOUT to wait longer, or end that process"
                              % (timeout, holder, what))
        time.sleep(delay)
        delay = min(delay * 1.5, 0.2)
    import socket
    os.ftruncate(fd, 0)
    os.pwrite(fd, ("pid %d on %s" % (os.getpid(), socket.gethostname())).encode(), 0)


def _remove_stale(root, key):
    """Temporary trees of `key` left by a process that died while unpacking (we hold the lock)."""
    prefix = ".tmp-%s-" % key
    for name in os.listdir(root):
        if name.startswith(prefix):
            _rmtree(os.path.join(root, name))


def _read_only(tree):
    for d, _, _ in os.walk(tree):
        os.chmod(d, 0o555)


def _rmtree(path):
    remove_tree(path)


def remove_tree(path) -> None:
    """Remove a tree whose directories may be read-only (unpacked images, the worker's cache
    entries); what cannot be removed stays (as rmtree's ignore_errors)."""
    import shutil

    def again(fn, p, exc_info):
        # a read-only directory: make it and the one above writable, then retry
        try:
            os.chmod(os.path.dirname(p), 0o700)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, 0o700)
                shutil.rmtree(p, ignore_errors=True)
            elif os.path.lexists(p):
                os.unlink(p)
        except OSError:
            pass
    shutil.rmtree(path, onerror=again)


def _log(root, rec):
    line = (json.dumps(rec, sort_keys=True) + "\n").encode()
    try:
        fd = os.open(os.path.join(root, LOG), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
    except OSError:
        pass


def unpack_log(local_dir=None) -> list:
    """The records of every unpack into this node's cache (for tests and diagnostics)."""
    try:
        with open(os.path.join(cache_root(local_dir), LOG)) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


# ---------------------------------------------------------------------------------- images
class LocalEnv:
    """An image unpacked on this node.  `root` is its directory; `env_for(base_env)` is the
    environment a process must get to run inside it."""

    def __init__(self, root: str, manifest: Manifest):
        self.root = root
        self.manifest = manifest
        self.id = manifest.id
        self.kind = manifest.kind

    def __repr__(self):
        return "<LocalEnv %s %s at %s>" % (self.kind, self.id[:12], self.root)

    def _paths(self, key) -> list:
        layout = self.manifest.data.get("layout") or {}
        v = layout.get(key) or []
        return [os.path.join(self.root, p) for p in ([v] if isinstance(v, str) else v)]

    @property
    def pythonpath(self) -> list:
        """The directories of a Python image, in sys.path order."""
        return self._paths("pythonpath")

    def env_for(self, base_env=None, *, extra_pythonpath=()) -> dict:
        """A copy of `base_env` (default os.environ) changed to run inside this image.

        Python images: PYTHONPATH is the image's directories (plus `extra_pythonpath`, kept
        after them; the caller's PYTHONPATH is dropped), PYTHONNOUSERSITE=1 and
        PYTHONDONTWRITEBYTECODE=1; the image's sitecustomize then removes every other sys.path
        entry but the interpreter's standard library, and refuses an interpreter of another
        ABI.  Julia images: JULIA_DEPOT_PATH (a writable node-local depot, then the image's),
        JULIA_PROJECT, JULIA_LOAD_PATH=@:@stdlib, JULIA_PKG_OFFLINE, and the image's bin/julia
        (which adds --sysimage) first on PATH.  Every kind: VINEHPC_IMAGE=root and
        VINEHPC_IMAGE_ID=id."""
        env = dict(os.environ if base_env is None else base_env)
        env["VINEHPC_IMAGE"] = self.root
        env["VINEHPC_IMAGE_ID"] = self.id
        bins = [p for p in self._paths("bin") if os.path.isdir(p)]
        if bins:
            env["PATH"] = os.pathsep.join(bins + ([env["PATH"]] if env.get("PATH") else []))
        if self.kind == "python":
            for k in ("PYTHONPATH", "PYTHONUSERBASE", "PYTHONSTARTUP"):
                env.pop(k, None)
            env["PYTHONPATH"] = os.pathsep.join(self.pythonpath + [os.fspath(p) for p in extra_pythonpath])
            env["PYTHONNOUSERSITE"] = "1"
            env["PYTHONDONTWRITEBYTECODE"] = "1"
        elif self.kind == "julia":
            writable = os.path.join(os.path.dirname(self.root), self.id + ".julia-depot")
            env["JULIA_DEPOT_PATH"] = os.pathsep.join([writable] + self._paths("depot"))
            project = self._paths("project")
            if project:
                env["JULIA_PROJECT"] = project[0]
            env["JULIA_LOAD_PATH"] = "@:@stdlib"
            env["JULIA_PKG_OFFLINE"] = "true"
        return env

    def python_mismatch(self) -> str | None:
        """None if this interpreter can use this (Python) image, else why not, as a sentence."""
        py = self.manifest.data.get("python")
        if self.kind != "python" or not py:
            return None
        import sysconfig
        here = (sys.implementation.cache_tag, sysconfig.get_platform())
        there = (py.get("cache_tag"), py.get("platform"))
        if here == there:
            return None
        return ("image %s was built for %s on %s (Python %s) but this interpreter (%s) is %s on %s"
                % (self.manifest.path, there[0], there[1], py.get("version"), sys.executable, here[0], here[1]))


def ensure_local(image_path, expected_hash=None, *, local_dir=None) -> LocalEnv:
    """Unpack the image at `image_path` into this node's cache (once per node), return it.

    `expected_hash`: the image id the caller expects (image.image_id() on the manager's
    side, or a prefix of at least 12 characters); a different image is an ImageError.
    Raises ImageError (not an image, truncated, corrupted, wrong id) or DeployError (cache
    not usable); in every error case nothing partial is left in use."""
    man = read_manifest(image_path)
    if expected_hash is not None:
        if len(expected_hash) < 12 or not man.id.startswith(expected_hash):
            raise ImageError("%s has id %s, expected %s: a different or changed image"
                             % (man.path, man.id, expected_hash))
    root = ensure_unpacked(man.id, lambda tmp: extract(man, tmp), what=os.fspath(image_path),
                           local_dir=local_dir)
    return LocalEnv(root, man)


# ---------------------------------------------------------------------------------- vinehpc.pyz
def unpack_zip(pyz: str, manifest: dict, dest: str, prefix: str = "payload/") -> None:
    """Extract the files that `manifest["files"]` lists from the zip `pyz` (under `prefix`)
    into `dest`, checking each file's sha256.  Used by vinehpc.pyz's __main__."""
    import hashlib
    import zipfile
    import zlib
    try:
        with zipfile.ZipFile(pyz) as z:
            for rel, want in sorted(manifest["files"].items()):
                target = os.path.join(dest, _check_name(rel))
                os.makedirs(os.path.dirname(target), 0o755, exist_ok=True)
                h = hashlib.sha256()
                with z.open(prefix + rel) as src, open(target, "wb") as out:
                    while True:
                        chunk = src.read(1 << 20)
                        if not chunk:
                            break
                        h.update(chunk)
                        out.write(chunk)
                if h.hexdigest() != want[1]:
                    raise ImageError("%s is corrupted: %s does not match its sha256" % (pyz, rel))
                os.chmod(target, want[3] & 0o555)
    except (zipfile.BadZipFile, zlib.error, KeyError, EOFError) as e:
        raise ImageError("%s is corrupted or truncated: %s (copy it again)" % (pyz, e)) from None
