"""Every VINEHPC_* environment variable that sysimage_tools reads is read here, and only here.

Standard library only: this runs on nodes from a packed image or vinehpc.pyz, without the
engine (vinehpc/config.py holds the engine's variables).
"""
from __future__ import annotations

import os


def local_dir() -> str:
    """Where node-local copies of images go: VINEHPC_LOCAL_DIR, else $TMPDIR, else /tmp.

    Point VINEHPC_LOCAL_DIR at the node's local disk (e.g. /local/scratch/$USER, or
    $SLURM_TMPDIR-style job directories); never at a shared filesystem."""
    return os.environ.get("VINEHPC_LOCAL_DIR") or os.environ.get("TMPDIR") or "/tmp"


def unpack_timeout() -> float:
    """VINEHPC_UNPACK_TIMEOUT: seconds a process waits for another one on the same node
    to finish unpacking an image before giving up (default 900)."""
    v = os.environ.get("VINEHPC_UNPACK_TIMEOUT")
    if not v:
        return 900.0
    try:
        t = float(v)
    except ValueError:
        t = -1.0
    if t <= 0:
        raise ValueError("VINEHPC_UNPACK_TIMEOUT must be a positive number of seconds, got %r" % v)
    return t
