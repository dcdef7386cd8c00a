"""Receiving a file in chunks: the one place for both sides (the worker's cache puts, the
manager's task outputs and fetched temps).

The bytes go to a part file beside the destination; the last chunk puts it in place with one
rename (a directory travels as a tar and is unpacked beside it first), so nobody ever sees
half a file under the real name, and a crash leaves only the part behind.
"""
from __future__ import annotations

import os
import shutil
import tarfile

from sysimage_tools.deploy import remove_tree


class Incoming:
    """One file on its way.  An error while writing is kept and raised by finish(), so the
    sender's remaining chunks are swallowed and the caller handles the failure once."""

    def __init__(self, dest: str, part: str, *, tar: bool = False, mode: int | None = None, parents: bool = False):
        """tar: the bytes are a tar of a directory; mode: permissions of a plain file once in
        place (None: as created); parents: create dest's directory."""
        self.dest, self.part, self.tar, self.mode = dest, part, tar, mode
        self.error = None
        self.f = None
        try:
            if parents:
                os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
            self.f = open(part, "wb")
        except OSError as e:
            self.error = e

    def write(self, data) -> None:
        if self.f is None:
            return
        try:
            self.f.write(data)
            self.f.flush()      # in the file now: a put is served to peers as it arrives (worker/cache.py)
        except OSError as e:
            self.error = e
            self.abort()

    def finish(self) -> None:
        """The last chunk arrived: put the file in place (raises OSError, tarfile.TarError)."""
        if self.error is not None:
            self.abort()
            raise self.error
        self.f.close()
        self.f = None
        install(self.part, self.dest, tar=self.tar, mode=self.mode)

    def abort(self) -> None:
        """Give up: nothing stays behind."""
        if self.f is not None:
            self.f.close()
            self.f = None
        for p in (self.part, self.part + ".d"):
            remove_path(p)


def install(part: str, dest: str, *, tar: bool = False, mode: int | None = None) -> None:
    """Put a complete part file in place atomically (a tar is unpacked into a directory first;
    an existing directory at dest is replaced)."""
    if not tar:
        if mode is not None:
            os.chmod(part, mode)
        os.replace(part, dest)
        return
    tmp = part + ".d"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        with tarfile.open(part) as t:
            check_room(t, tmp)
            t.extractall(tmp, filter="data")    # refuses members that would leave tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.unlink(part)
    if os.path.isdir(dest) and not os.path.islink(dest):
        old = part + ".old"
        os.rename(dest, old)
        os.rename(tmp, dest)
        remove_path(old)
    else:
        os.replace(tmp, dest)


class TooLarge(tarfile.TarError):
    """A tar whose files would not fit where it is unpacked: the tar's fault, not the disk's."""


def check_room(t, where: str) -> None:
    """Refuse (TooLarge) a tar whose files, as their headers declare them, hold more than
    the free space where it is unpacked: a small (compressed, or sparse) tar of huge members --
    a decompression bomb -- fails at the header that passes the limit, before anything is
    written, not when the disk is full.  (Reads the headers once; extractall reuses them.)"""
    free, total = shutil.disk_usage(where).free, 0
    for m in t:
        if m.isreg():
            total += m.size
            if total > free:
                raise TooLarge("refusing to unpack: its files hold at least %d bytes, %d are free" % (total, free))


def remove_path(p) -> None:
    """Remove a file, link or directory tree (read-only directories too: cache entries are);
    gone already is fine."""
    try:
        if os.path.isdir(p) and not os.path.islink(p):
            remove_tree(p)
        else:
            os.unlink(p)
    except FileNotFoundError:
        pass
