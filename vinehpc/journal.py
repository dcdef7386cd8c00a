"""Append-only JSON-lines log of every task and worker event (the run's transactions)."""
from __future__ import annotations

import collections
import json
import os
import time

from .protocol.wire import json_encoder

_encode = json_encoder(str)     # built once: this is hot (three records per task)


class Journal:
    """Records are encoded when written and reach the file at the next flush (the manager's I/O
    thread flushes after every loop turn), all of them in one write."""

    def __init__(self, path: str | None):
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666) if path else None
        # encoded lines not yet written; a deque: the user's thread writes a record now and then
        # while the I/O thread flushes (append and popleft are atomic)
        self._lines = collections.deque()

    def write(self, rec: dict) -> None:
        if self._fd is None:
            return
        if "time" in rec:
            self._lines.append(_encode(rec))
        else:   # the time spliced in: cheaper than adding it to the record and encoding it
            s = _encode(rec)
            self._lines.append('%s,"time":%.6f}' % (s[:-1], time.time()) if len(s) > 2 else
                               '{"time":%.6f}' % time.time())

    def flush(self) -> None:
        q = self._lines
        if self._fd is None or not q:
            return
        parts = [q.popleft() for _ in range(len(q))]
        parts.append("")
        data = memoryview("\n".join(parts).encode())
        while data:
            data = data[os.write(self._fd, data):]

    def close(self) -> None:
        if self._fd is not None:
            self.flush()
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None


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
