"""The .vimg environment-image format: build, read, verify and extract.

One file, so it travels as one transfer (a worker's file cache, sbcast, cp) and one open()
on a shared filesystem.  Layout (integers big-endian):

    0   magic            8 bytes  b"\\x89VIMG\\r\\n\\x1a" (non-ASCII + CRLF: a text-mode copy breaks it)
    8   format version   u16      1
    10  manifest offset  u64
    18  manifest length  u32
    22  payload          one zstd frame (with content checksum) of an uncompressed tar stream
    manifest offset: the manifest, UTF-8 JSON (python ABI, packages, creation command,
        every file's sha256/size/mode, the payload's size and sha256)

The manifest comes last so a build is one streaming pass.  The image **id** is the sha256 of
header + manifest: the manifest pins the payload's sha256, so the id names every byte, yet
finding it costs two small reads (the run path never hashes the payload).  Extraction checks
the payload hash, zstd's checksum, the tar structure and every file's hash; any mismatch is an
ImageError, raised before anything extracted is put to use (deploy.py unpacks into a temporary
directory and renames it into place only after extract() returned).

Why zstd: every node decompresses every image, so decompression speed dominates; zstd
decompresses at ~1 GB/s (about 10x lzma) with a ratio close to xz at the levels used here.
The read side needs only the standard library and `zstandard`.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import stat as _stat
import struct

MAGIC = b"\x89VIMG\r\n\x1a"
FORMAT_VERSION = 1
HEADER = struct.Struct("!8sHQI")
MAX_MANIFEST = 256 << 20
FIXED_MTIME = 1577836800      # 2020-01-01: file times carry nothing (pycs are unchecked-hash)
CHUNK = 1 << 20


class ImageError(Exception):
    """An image that cannot be read or used: not an image, truncated, corrupted, wrong ABI."""


class Manifest:
    """A parsed image header + manifest.  `data` is the manifest dict; `id` the image id."""

    def __init__(self, path, data, image_id, payload_size):
        self.path = path
        self.data = data
        self.id = image_id
        self.payload_offset = HEADER.size
        self.payload_size = payload_size

    @property
    def kind(self) -> str:
        return self.data.get("kind", "files")

    @property
    def files(self) -> dict:
        return self.data.get("files", {})

    def summary(self) -> str:
        d = self.data
        py = d.get("python") or {}
        lines = ["image     %s" % self.path,
                 "id        %s" % self.id,
                 "kind      %s" % self.kind,
                 "created   %s by %s" % (d.get("created", "?"), d.get("created_by", "?")),
                 "command   %s" % " ".join(d.get("command") or []),
                 "files     %d, %.1f MB unpacked, %.1f MB compressed (zstd)"
                 % (sum(1 for v in self.files.values() if v[0] == "f"), d.get("unpacked_size", 0) / 1e6,
                    self.payload_size / 1e6)]
        if py:
            lines.append("python    %s %s (%s, %s)" % (py.get("implementation"), py.get("version"),
                                                      py.get("cache_tag"), py.get("platform")))
        if d.get("julia"):
            lines.append("julia     %s (cpu_target %s)" % (d["julia"].get("version"), d["julia"].get("cpu_target")))
        pk = d.get("packages") or {}
        if pk:
            lines.append("packages  %s" % ", ".join("%s %s" % kv for kv in sorted(pk.items())))
        return "\n".join(lines)


# ---------------------------------------------------------------------------------- reading
def read_manifest(path) -> Manifest:
    """Header and manifest of the image at `path` (cheap: two reads).  Detects files that are
    not images, truncated copies and unfinished builds; payload corruption is found by extract()
    or verify()."""
    path = os.fspath(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ImageError("cannot open image %s: %s" % (path, e.strerror or e)) from None
    with f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(HEADER.size)
        if size == 0:
            raise ImageError("%s is empty (0 bytes): not a vinehpc image, or a failed copy" % path)
        if head[:len(MAGIC)] != MAGIC[:len(head)]:
            raise ImageError("%s is not a vinehpc image (it does not start with the VIMG header)" % path)
        if len(head) < HEADER.size:
            raise ImageError("%s is truncated: %d bytes, shorter than an image header" % (path, size))
        _, version, moff, mlen = HEADER.unpack(head)
        if version > FORMAT_VERSION:
            raise ImageError("%s has image format version %d; this vinehpc reads version %d or older: "
                             "upgrade vinehpc" % (path, version, FORMAT_VERSION))
        if moff == 0:
            raise ImageError("%s is incomplete: the build that wrote it did not finish" % path)
        if mlen > MAX_MANIFEST or moff < HEADER.size:
            raise ImageError("%s is corrupted: impossible manifest position (%d, %d bytes)" % (path, moff, mlen))
        if moff + mlen > size:
            raise ImageError("%s is truncated: it has %d bytes, the image is %d bytes long (copy it again)"
                             % (path, size, moff + mlen))
        if moff + mlen < size:
            raise ImageError("%s is corrupted: %d unexpected bytes after its end" % (path, size - moff - mlen))
        f.seek(moff)
        mbytes = f.read(mlen)
    try:
        data = json.loads(mbytes.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ImageError("%s is corrupted: its manifest is not valid JSON" % path) from None
    if not isinstance(data, dict) or data.get("format") != "vinehpc-image" or not isinstance(data.get("files"), dict):
        raise ImageError("%s is corrupted: its manifest is not a vinehpc image manifest" % path)
    payload_size = moff - HEADER.size
    if (data.get("payload") or {}).get("size") != payload_size:
        raise ImageError("%s is corrupted: the payload size does not match the manifest" % path)
    return Manifest(path, data, hashlib.sha256(head + mbytes).hexdigest(), payload_size)


def image_id(path) -> str:
    """The id of the image at `path` (what deploy.ensure_local's expected_hash compares to)."""
    return read_manifest(path).id


def verify(path) -> Manifest:
    """Read the whole image and check every hash; raises ImageError on any problem."""
    man = read_manifest(path)
    _walk(man, None)
    return man


def extract(man: Manifest, dest: str) -> None:
    """Unpack the image into the existing, empty directory `dest`, checking everything.

    On ImageError, `dest` holds a partial tree: the caller must discard it (deploy.py does).
    The files' sizes the manifest declares must fit in dest's free space, checked before
    anything is written, and a member larger than its manifest size is refused before its bytes
    are written: a decompression bomb fails at once, not when the disk is full."""
    import shutil
    size = sum(w[2] for w in man.files.values() if w[0] == "f")
    free = shutil.disk_usage(dest).free
    if size > free:
        raise ImageError("cannot unpack %s into %s: its files hold %d bytes, %d are free"
                         % (man.path, dest, size, free))
    _walk(man, dest)


class _Reader(io.RawIOBase):
    """Reads at most `limit` bytes of `f`, hashing them."""

    def __init__(self, f, limit):
        self.f, self.left, self.h, self.count = f, limit, hashlib.sha256(), 0

    def readable(self):
        return True

    def readinto(self, b):
        n = min(len(b), self.left)
        if n <= 0:
            return 0
        data = self.f.read(n)
        b[:len(data)] = data
        self.h.update(data)
        self.left -= len(data)
        self.count += len(data)
        return len(data)


def _check_name(name: str) -> str:
    if not name or name.startswith("/") or "\0" in name or posixpath.normpath(name) != name \
            or name == ".." or name.startswith("../"):
        raise ImageError("unsafe path in image: %r" % name)
    return name


def _walk(man: Manifest, dest):
    """Stream the payload; check names, types and hashes against the manifest; write into
    dest unless it is None."""
    import tarfile           # here, not at the top: the run path for an unpacked image never needs it
    import zstandard
    path, files = man.path, man.files
    seen, links = set(), set()

    def bad(why):
        return ImageError("%s is corrupted: %s (nothing from it was used; copy or build it again)" % (path, why))

    try:
        with open(path, "rb") as f:
            f.seek(man.payload_offset)
            raw = _Reader(f, man.payload_size)
            with zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=False) as zr:
                with tarfile.open(fileobj=zr, mode="r|") as tf:
                    for ti in tf:
                        name = _check_name(ti.name)
                        want = files.get(name)
                        if want is None:
                            raise bad("%s is in the payload but not in the manifest" % name)
                        if name in seen:
                            raise bad("%s appears twice" % name)
                        parts = name.split("/")
                        if any("/".join(parts[:i]) in links for i in range(1, len(parts))):
                            raise bad("%s lies below a symbolic link" % name)
                        seen.add(name)
                        target = None if dest is None else os.path.join(dest, name)
                        if ti.isdir() and want[0] == "d":
                            if target is not None:
                                os.makedirs(target, 0o755, exist_ok=True)
                        elif ti.issym() and want[0] == "l" and ti.linkname == want[1]:
                            _check_link(name, ti.linkname)
                            links.add(name)
                            if target is not None:
                                _parent(target)
                                os.symlink(ti.linkname, target)
                        elif ti.isreg() and want[0] == "f":
                            if ti.size != want[2]:
                                raise bad("%s holds %d bytes, the manifest says %d" % (name, ti.size, want[2]))
                            _copy_member(tf.extractfile(ti), target, want, name, bad)
                        else:
                            raise bad("%s: type or link does not match the manifest" % name)
                while zr.read(CHUNK):          # the tar's trailing padding
                    pass
            while raw.read(CHUNK):
                pass
    except ImageError:
        raise
    except zstandard.ZstdError as e:
        raise bad("compressed data: %s" % e) from None
    except (tarfile.TarError, EOFError) as e:
        raise bad("archive: %s" % e) from None
    except OSError as e:
        if dest is None:
            raise ImageError("cannot read %s: %s" % (path, e)) from None
        raise ImageError("cannot unpack %s into %s: %s" % (path, dest, e)) from None
    if raw.count != man.payload_size or raw.h.hexdigest() != man.data["payload"]["sha256"]:
        raise bad("the payload's sha256 does not match the manifest")
    missing = set(files) - seen
    if missing:
        raise bad("%d files are missing from the payload, e.g. %s" % (len(missing), sorted(missing)[0]))


def _parent(target):
    d = os.path.dirname(target)
    if not os.path.isdir(d):
        os.makedirs(d, 0o755, exist_ok=True)


def _outside(rel, link, path) -> bool:
    """True for a link that leaves the tree and points at a file (stored as that file)."""
    try:
        _check_link(rel, link)
        return False
    except ImageError:
        if os.path.isfile(path):
            return True
        raise ImageError("cannot pack %s: a symbolic link to %s, outside the image" % (path, link)) from None


def _check_link(name, link):
    full = posixpath.normpath(posixpath.join(posixpath.dirname(name), link))
    if link.startswith("/") or full == ".." or full.startswith("../"):
        raise ImageError("unsafe symbolic link in image: %s -> %s" % (name, link))


def _copy_member(src, target, want, name, bad):
    _, digest, size, mode = want
    h = hashlib.sha256()
    n = 0
    out = None
    if target is not None:
        _parent(target)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        out = os.fdopen(fd, "wb")
    try:
        while True:
            chunk = src.read(CHUNK)
            if not chunk:
                break
            h.update(chunk)
            n += len(chunk)
            if out is not None:
                out.write(chunk)
    finally:
        if out is not None:
            out.close()
    if n != size or h.hexdigest() != digest:
        raise bad("%s does not match its sha256 in the manifest" % name)
    if target is not None:
        os.chmod(target, mode & 0o555)     # read-only: tasks must not change a shared environment


# ---------------------------------------------------------------------------------- building
def scan(tree: str) -> list:
    """(relative name, kind 'd'/'f'/'l', absolute path) below `tree`, sorted, directories first."""
    out = []

    def rec(d, rel):
        with os.scandir(d) as it:
            ents = sorted(it, key=lambda e: e.name)
        for e in ents:
            r = rel + e.name
            if e.is_symlink():
                out.append((r, "l", e.path))
            elif e.is_dir():
                out.append((r, "d", e.path))
                rec(e.path, r + "/")
            elif e.is_file():
                out.append((r, "f", e.path))
            # sockets, fifos, devices: not part of an environment
    rec(tree, "")
    return out


class _HashWriter(io.RawIOBase):
    def __init__(self, f):
        self.f, self.h, self.count = f, hashlib.sha256(), 0

    def writable(self):
        return True

    def write(self, b):
        self.f.write(b)
        self.h.update(b)
        self.count += len(b)
        return len(b)


class _HashReader(io.RawIOBase):
    def __init__(self, f):
        self.f, self.h, self.count = f, hashlib.sha256(), 0

    def readable(self):
        return True

    def readinto(self, b):
        n = self.f.readinto(b)
        if n:
            self.h.update(memoryview(b)[:n])
            self.count += n
        return n


def build(out: str, tree: str, meta: dict, *, level: int = 10, threads: int = -1) -> Manifest:
    """Pack the directory `tree` into the image `out` (written atomically), with `meta`
    merged into the manifest.  A symbolic link out of `tree` is stored as the file it
    points to (a link to a directory outside is an error)."""
    import tarfile
    import zstandard
    out = os.fspath(out)
    entries = scan(tree)
    files = {}
    unpacked = 0
    tmp = "%s.tmp-%d" % (out, os.getpid())
    try:
        with open(tmp, "wb") as f:
            f.write(b"\0" * HEADER.size)
            hw = _HashWriter(f)
            cctx = zstandard.ZstdCompressor(level=level, threads=threads, write_checksum=True)
            with cctx.stream_writer(hw, closefd=False) as zw:
                with tarfile.open(fileobj=zw, mode="w|", format=tarfile.PAX_FORMAT) as tf:
                    for rel, kind, p in entries:
                        ti = tarfile.TarInfo(rel)
                        ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = FIXED_MTIME, 0, 0, "", ""
                        if kind == "d":
                            ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                            tf.addfile(ti)
                            files[rel] = ["d"]
                        elif kind == "l" and not _outside(rel, os.readlink(p), p):
                            link = os.readlink(p)
                            ti.type, ti.linkname, ti.mode = tarfile.SYMTYPE, link, 0o777
                            tf.addfile(ti)
                            files[rel] = ["l", link]
                        else:                  # a file, or a link out of the tree: its file
                            with open(p, "rb") as src:
                                st = os.fstat(src.fileno())
                                ti.size, ti.mode = st.st_size, _stat.S_IMODE(st.st_mode) & 0o755 | 0o444
                                hr = _HashReader(src)
                                tf.addfile(ti, hr)
                            files[rel] = ["f", hr.h.hexdigest(), st.st_size, ti.mode]
                            unpacked += st.st_size
            manifest = dict(meta)
            manifest.update({
                "format": "vinehpc-image", "format_version": FORMAT_VERSION,
                "files": files, "unpacked_size": unpacked,
                "payload": {"format": "tar", "compression": "zstd", "level": level,
                            "size": hw.count, "sha256": hw.h.hexdigest()},
            })
            mbytes = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode("utf-8")
            f.write(mbytes)
            f.seek(0)
            f.write(HEADER.pack(MAGIC, FORMAT_VERSION, HEADER.size + hw.count, len(mbytes)))
        os.replace(tmp, out)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return read_manifest(out)
