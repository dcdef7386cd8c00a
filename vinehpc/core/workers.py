"""Workers as the core sees them, and which of them are kept out for a while (sick workers)."""
from __future__ import annotations

import collections

from ..protocol.messages import RES   # defined once, for both sides

# WorkerState.tasks and .fns while empty: a set is one more object a worker for the collector's full
# passes, and on a large fleet those objects are cache-cold (issue 15: 50,000 of them, 30 ms a pass)
NONE = frozenset()


def added(s, item):
    """`s` (a set, or NONE while empty) with `item` in it: `w.tasks = added(w.tasks, tid)`."""
    if s:
        s.add(item)
        return s
    return {item}


class Cached(set):
    """A worker's cached files that keep the core's index of where each file is (`where`: cache
    name -> ids of the workers holding it) as they change, so the "files" policy looks at the
    workers holding a task's inputs instead of at every worker."""
    __slots__ = ("where", "wid")

    def __init__(self, names, where, wid):
        super().__init__(names)
        self.where, self.wid = where, wid
        for n in self:
            where.setdefault(n, set()).add(wid)

    def add(self, n):
        set.add(self, n)
        self.where.setdefault(n, set()).add(self.wid)

    def discard(self, n):
        set.discard(self, n)
        s = self.where.get(n)
        if s is not None:
            s.discard(self.wid)
            if not s:
                del self.where[n]

    def remove(self, n):
        if n not in self:
            raise KeyError(n)
        self.discard(n)

    def update(self, *names):
        for it in names:
            for n in it:
                self.add(n)

    def clear(self):
        """Out of the index too (the worker is gone)."""
        for n in list(self):
            self.discard(n)


class WorkerState:
    __slots__ = ("wid", "host", "total", "committed", "tasks", "cached", "fns",
                 "outstanding", "info", "warned", "order", "hkey", "full", "since")

    def __init__(self, wid, info, where=None):
        """`where`: the core's index of cached files (Cached); None: a plain set."""
        self.wid = wid
        self.info = info
        self.host = info.get("host", "?")
        self.total = {k: int(info.get(k) or 0) for k in RES}
        self.committed = dict.fromkeys(RES, 0)
        self.tasks = NONE         # ids of the tasks it holds: a set from the first, NONE again when idle
        names = info.pop("cached", None) or ()      # indexed here: the list itself is not kept
        self.cached = set(names) if where is None else Cached(names, where, wid)
        self.fns = NONE           # function ids it holds: a set from the first
        self.outstanding = 0
        self.warned = False
        self.order = wid          # join order, set by the core
        self.hkey = None          # its level (tasks outstanding) in the core's index of workers with room
        self.since = 0            # when it came to that level (Core.stamp): ties in load go to the longest there
        self.full = False         # left the index full of tasks sent ahead: back when half of them are done

    def __repr__(self):
        return "<worker %s %s %s>" % (self.wid, self.host, self.total)


class Blocklist:
    """Hosts (every worker on them) or single workers that get no new tasks until a time.

    A worker is blocked after FAULTS_TO_BLOCK failures that were its own (cannot stage
    inputs, disk full...) within FAULT_WINDOW, or (by the core) after tasks were fast-aborted
    there.  `log(event, **fields)` writes a journal record."""
    BLOCK_SECONDS = 300.0
    FAULTS_TO_BLOCK = 3
    FAULT_WINDOW = 300.0

    def __init__(self, log):
        self.log = log
        self.blocked = {}                  # host or wid -> (until, why)
        self.faults = {}                   # wid -> times of its recent worker-side failures

    def block(self, host, now, seconds=None, why="blocked by the user"):
        if seconds == 0:
            until = float("inf")
        else:
            until = now + (self.BLOCK_SECONDS if seconds is None else seconds)
        self.blocked[host] = (until, why)
        self.log("host blocked", host=host, until=None if until == float("inf") else round(until, 3), reason=why)

    def unblock(self, host):
        if self.blocked.pop(host, None) is not None:
            self.log("host unblocked", host=host)

    def __call__(self, w, now) -> bool:
        """Is worker `w` (by its host or by itself) blocked now?"""
        return bool(self.blocked) and (self._is(w.host, now) or self._is(w.wid, now))

    def _is(self, host, now) -> bool:
        b = self.blocked.get(host)
        if b is None:
            return False
        if now >= b[0]:
            del self.blocked[host]
            self.log("host unblocked", host=host, reason="block expired")
            return False
        return True

    def fault(self, w, why, now):
        """A failure that is the worker's, not the task's.  Counted over a window whatever else
        succeeds there meanwhile: a worker that cannot stage files must not keep bouncing the
        tasks that need them."""
        times = self.faults.setdefault(w.wid, collections.deque())
        times.append(now)
        while times and times[0] < now - self.FAULT_WINDOW:
            times.popleft()
        if len(times) >= self.FAULTS_TO_BLOCK:
            self.block(w.wid, now, why="%d worker-side failures within %.0f s on worker %s (%s), last: %s"
                       % (len(times), self.FAULT_WINDOW, w.wid, w.host, why))
            times.clear()
