"""Append-only JSON-lines log of every task and worker event (the run's transactions)."""
from __future__ import annotations

import collections
import json
import os
import threading
import time

from .private import private_fd
from .protocol.wire import json_encoder, orjson

_json = json_encoder(str)       # built once: this is hot (three records per task)
if orjson is not None:
    # 5-8x json's C encoder (a record took 3-5 us of it, three records a task: issue 15).  Subclasses
    # of str/int/dict/list orjson writes as json does; anything else it does not write as json
    # would (a float subclass such as numpy's float64, which json writes as a number; datetimes and
    # dataclasses, which json writes with str()) makes the record go to json's encoder, as do the
    # values orjson refuses (an int past 64 bits, a non-string key, a lone surrogate).  The
    # differences: an Enum is written by its value (json: str()), NaN and infinities as null (json:
    # NaN, which is not JSON) -- none is recorded: a worker's figures are checked finite, a user's
    # limits must be finite
    _OPT = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS

    def _refuse(o):
        raise TypeError

    def _encode(rec) -> bytes:
        try:
            return orjson.dumps(rec, default=_refuse, option=_OPT)
        except TypeError:
            return _json(rec).encode()
else:       # pragma: no cover - orjson is a dependency
    def _encode(rec) -> bytes:
        return _json(rec).encode()
# records kept as written at most; more are encoded at once.  A record is a dict the garbage
# collector tracks (most hold a dict: resources, allocated): thousands of them waiting through a
# long loop turn (a thousand workers' results) outlived two young collections, were promoted to the
# oldest generation and made full collections -- walking every queued task -- come twice as often:
# the collector cost more than the journal (issue 15)
PENDING = 512


class Journal:
    """Records are kept as written and encoded at the next flush, all in one write: the manager's
    I/O thread flushes after it has sent what a loop turn made, so encoding the turn's records
    (three per task) is not on a task's way to its worker -- up to PENDING of them: a long turn's
    earlier records are encoded PENDING at a time as they come (see PENDING)."""

    def __init__(self, path: str | None):
        self.path = path
        self._fd = private_fd(path) if path else None     # 0600 whatever the umask
        # records not yet written; a deque: the user's thread writes a record now and then
        # while the I/O thread flushes (append and popleft are atomic)
        self._recs = collections.deque()
        self._text = []                   # records encoded before the flush (PENDING), in order (bytes)
        self._lock = threading.Lock()     # flush and close: the I/O thread's last flush may meet close()

    def write(self, rec: dict):
        """Keep `rec` for the next flush; returns the time the journal gives it (its own `time`,
        else now, which is then put in it as `time`, last).

        The record is the journal's from now on: the writer neither changes it nor what it holds
        (a record that shows a task's resources holds a copy of them: see core/state.py's _log).
        No copy is made here: three to four records per task, and copying each one was a quarter
        of what the journal cost the manager's I/O thread."""
        t = rec.get("time")
        if t is None:
            # the line says it exactly (the shortest repr that reads back as this float, orjson's as
            # json's): the live figures (rates over the run's span) and a replay's are the same
            t = rec["time"] = time.time()
        if self._fd is not None:
            q = self._recs
            q.append(rec)
            if len(q) >= PENDING:
                with self._lock:
                    if self._fd is not None:
                        self._text.append(self._encode())
        return t

    def flush(self) -> None:
        if not self._recs and not self._text:
            return
        with self._lock:
            self._flush()

    def _encode(self) -> bytes:
        """The lines of the records kept (taken from the queue; under the lock)."""
        q = self._recs
        lines = [_encode(q.popleft()) for _ in range(len(q))]
        lines.append(b"")
        return b"\n".join(lines)

    def _flush(self):
        if self._fd is None or not (self._recs or self._text):
            return
        text, self._text = self._text, []
        if self._recs:
            text.append(self._encode())
        data = memoryview(b"".join(text))
        while data:
            data = data[os.write(self._fd, data):]

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                self._flush()
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = None


def read(path: str) -> list:
    """All records of a transactions log (a torn last line is skipped)."""
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out
