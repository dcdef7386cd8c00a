"""Append-only JSON-lines log of every task and worker event (the run's transactions)."""
from __future__ import annotations

import json
import os
import time

from .private import open_private


_encode = json.JSONEncoder(separators=(",", ":"), default=str).encode   # built once: this is hot


class Journal:
    def __init__(self, path: str | None):
        self.path = path
        self._f = open_private(path, "a", buffering=1 << 16) if path else None
        self._dirty = False

    def write(self, rec: dict) -> None:
        if self._f is None:
            return
        rec.setdefault("time", round(time.time(), 6))
        self._f.write(_encode(rec))
        self._f.write("\n")
        self._dirty = True

    def flush(self) -> None:
        if self._f is not None and self._dirty:
            self._f.flush()
            self._dirty = False

    def close(self) -> None:
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self._f = None


def read(path: str) -> list:
    """All records of a transactions log (a torn last line is skipped)."""
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out
