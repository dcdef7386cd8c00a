"""A run's progress on stderr, for `vinehpc run` and the pilot's rank 0.

On a terminal: one line redrawn in place twice a second.  Elsewhere (a batch job's log, a pipe):
a line every `interval` seconds (a minute by default), since a redrawn line would be noise in a
file.  At the end, one summary line in both cases.  Elapsed time counts from the run's start; the
ETA is for the tasks submitted so far, at the average rate since the first one finished.
"""
from __future__ import annotations

import sys
import threading
import time

KEYS = ("done", "failed", "running", "waiting", "workers")


def duration(s: float) -> str:
    """12s, 3m05s, 2h07m: short enough for a line that must fit a terminal."""
    s = int(round(max(0.0, s)))
    if s < 60:
        return "%ds" % s
    if s < 3600:
        return "%dm%02ds" % divmod(s, 60)
    return "%dh%02dm" % (s // 3600, s % 3600 // 60)


def totals(managers) -> dict | None:
    """The sum of KEYS over `managers`' stats (None when none answered: closing, or busy)."""
    tot, any_ = dict.fromkeys(KEYS, 0), False
    for m in managers:
        try:
            s = m.stats
        except Exception:      # closing, or its I/O thread is busy: the next turn shows it
            continue
        any_ = True
        for k in KEYS:
            tot[k] += s.get(k, 0)
    return tot if any_ else None


class Progress:
    """`managers()`: the open managers to count now (those closed are added by closed())."""

    def __init__(self, label: str, managers, *, live: bool, interval: float = 60.0, stream=None):
        self.label, self.managers = label, managers
        self.finished = dict.fromkeys(KEYS, 0)       # totals of the managers already closed
        self._lock = threading.Lock()
        self.live, self.interval = live, interval
        self.stream = stream or sys.stderr
        self.t0 = time.monotonic()
        self.shown = False           # a live line is on the terminal
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="vinehpc-progress")

    def start(self) -> "Progress":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:      # started
            self._thread.join(2)
        self.clear()

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.shown = False

    def closed(self, manager) -> None:
        """A manager closed: its final counts stay in the run's (its workers do not)."""
        final = totals([manager]) or {}
        with self._lock:
            for k in KEYS:
                if k != "workers":
                    self.finished[k] += final.get(k, 0)

    def counts(self) -> dict | None:
        now = totals(self.managers())
        with self._lock:
            before = dict(self.finished)
        if now is None and not any(before.values()):
            return None
        return {k: (now or {}).get(k, 0) + before.get(k, 0) for k in KEYS}

    def line(self, tot: dict) -> str:
        elapsed = time.monotonic() - self.t0
        finished = tot["done"] + tot["failed"]
        left = tot["running"] + tot["waiting"]
        s = ("{done:,} done, {running:,} running, {waiting:,} waiting, {failed:,} failed | {workers} workers"
             .format(**tot)) + " | %s elapsed" % duration(elapsed)
        if finished and elapsed > 0:
            rate = finished / elapsed
            s += " | %.3g tasks/s" % rate
            if left:
                s += " | ETA %s" % duration(left / rate)
        return "%s: %s" % (self.label, s)

    def summary(self, where: str = "") -> None:
        """The end-of-run line: what finished, in how long, how fast."""
        tot = self.counts() or dict.fromkeys(KEYS, 0)
        elapsed = time.monotonic() - self.t0
        finished = tot["done"] + tot["failed"]
        self.clear()
        self.stream.write("%s: %d done, %d failed in %s (%.3g tasks/s)%s\n"
                          % (self.label, tot["done"], tot["failed"], duration(elapsed),
                             finished / elapsed if elapsed > 0 else 0.0, "; " + where if where else ""))
        self.stream.flush()

    def _loop(self):
        last, last_at = "", time.monotonic()
        while not self._stop.wait(0.5):
            tot = self.counts()
            if tot is None:
                continue
            line = self.line(tot)
            if self.live:
                if line != last or not self.shown:
                    self.stream.write("\r\033[K" + line)
                    self.stream.flush()
                    self.shown = True
                    last = line
            elif time.monotonic() - last_at >= self.interval:
                self.stream.write(line + "\n")
                self.stream.flush()
                last_at = time.monotonic()
