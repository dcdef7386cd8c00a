"""The mount table (/proc/self/mountinfo), longest-prefix lookup, and which mounts are shared.

A shared filesystem is one whose metadata is served over the network to every node (NFS,
Lustre, GPFS, BeeGFS, CephFS, CernVM-FS, most FUSE filesystems, ...): there, every rank's stat()
is a request to the same server. `--shared PREFIX` adds trees the table cannot tell about (a
site's burst buffer, an NFS export re-mounted as something local-looking, test directories).
"""
from __future__ import annotations

import os
import re

MOUNTINFO = "/proc/self/mountinfo"

# fstype -> why it is shared
NETWORK_FS = {
    "nfs": "network filesystem", "nfs4": "network filesystem", "cifs": "network filesystem (SMB)",
    "smb3": "network filesystem (SMB)", "smbfs": "network filesystem (SMB)", "afs": "network filesystem (AFS)",
    "ncpfs": "network filesystem", "9p": "network/host-shared filesystem (9p)",
    "lustre": "parallel filesystem", "gpfs": "parallel filesystem (Spectrum Scale)",
    "beegfs": "parallel filesystem", "fhgfs": "parallel filesystem (BeeGFS)", "panfs": "parallel filesystem (Panasas)",
    "pvfs2": "parallel filesystem", "orangefs": "parallel filesystem", "wekafs": "parallel filesystem (WEKA)",
    "ceph": "distributed filesystem (CephFS)", "cephfs": "distributed filesystem",
    "glusterfs": "distributed filesystem",
    "quobyte": "distributed filesystem", "xtreemfs": "distributed filesystem", "dvs": "Cray DVS projection",
    "gfs2": "cluster filesystem", "ocfs2": "cluster filesystem",
    "cvmfs": "CernVM-FS (software served over HTTP)", "cvmfs2": "CernVM-FS (software served over HTTP)",
}
# FUSE filesystems that are node-local (container plumbing, images mounted on this node)
LOCAL_FUSE = frozenset(("fuse.lxcfs", "fuse.portal", "fuse.gvfsd-fuse", "fuse.squashfuse", "fuse.squashfuse_ll",
                        "fuse.fuse-overlayfs", "fuse.snapfuse", "fuse.appimage", "fusectl", "fuse.rofiles-fuse"))
_UNESCAPE = re.compile(r"\\([0-7]{3})")


class Mount:
    """One mount point: where, what filesystem, from where, and whether it is shared (and why)."""
    __slots__ = ("mountpoint", "fstype", "source", "shared", "why")

    def __init__(self, mountpoint, fstype, source="", shared=None, why=None):
        self.mountpoint, self.fstype, self.source = mountpoint, fstype, source
        if shared is None:
            why = classify(fstype, source)
            shared = why is not None
        self.shared, self.why = shared, why

    def to_json(self) -> dict:
        return {"mountpoint": self.mountpoint, "fstype": self.fstype, "source": self.source,
                "shared": self.shared, "why": self.why}

    def __repr__(self):
        return "Mount(%r, %r, shared=%r)" % (self.mountpoint, self.fstype, self.shared)


def classify(fstype: str, source: str = ""):
    """Why a filesystem of this type is shared, or None when it is node-local."""
    if fstype in NETWORK_FS:
        return "%s (%s)" % (NETWORK_FS[fstype], fstype)
    if fstype == "fuse" and source.startswith("cvmfs"):
        return "CernVM-FS (fuse, %s)" % source
    if fstype in LOCAL_FUSE:
        return None
    if fstype == "fuse" or fstype.startswith("fuse."):
        return "FUSE filesystem (%s): usually remote" % fstype
    return None


def parse_mountinfo(text: str) -> list:
    """mountinfo text -> [Mount]; a later mount on the same point hides an earlier one."""
    by_point = {}
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        f = left.split()
        r = right.split()
        if not sep or len(f) < 5 or not r:
            continue
        point = _UNESCAPE.sub(lambda m: chr(int(m.group(1), 8)), f[4])
        source = _UNESCAPE.sub(lambda m: chr(int(m.group(1), 8)), r[1]) if len(r) > 1 else ""
        by_point.pop(point, None)
        by_point[point] = Mount(point, r[0], source)
    return list(by_point.values())


def read_mounts(path: str = MOUNTINFO) -> list:
    try:
        with open(path) as f:
            return parse_mountinfo(f.read())
    except OSError:
        return [Mount("/", "unknown", "")]


class MountTable:
    """Longest-prefix lookup of paths in the mount table plus the `--shared` trees."""

    def __init__(self, mounts: list, shared_prefixes=()):
        self._cache: dict = {}
        self.by_point = {m.mountpoint: m for m in mounts}
        if "/" not in self.by_point:
            self.by_point["/"] = Mount("/", "unknown", "")
        for prefix in shared_prefixes:
            for p in _spellings(prefix):
                under = self.lookup(p)
                self.by_point[p] = Mount(p, under.fstype, under.source, shared=True,
                                         why="marked with --shared (%s underneath)" % under.fstype)
                self._cache.clear()

    def lookup(self, path: str) -> Mount:
        """The mount holding the absolute path `path` (component-wise longest prefix)."""
        m = self._cache.get(path)
        if m is not None:
            return m
        p = path
        while True:
            m = self.by_point.get(p)
            if m is not None:
                break
            if p == "/" or not p:
                m = self.by_point["/"]
                break
            p = os.path.dirname(p)
        self._cache[path] = m
        return m

    def mounts(self) -> list:
        return list(self.by_point.values())


def _spellings(prefix: str) -> list:
    """A --shared prefix as given (made absolute) and as resolved: traces show paths as programs spell them."""
    a = os.path.normpath(os.path.abspath(prefix))
    r = os.path.realpath(a)
    return [a] if r == a else [a, r]
