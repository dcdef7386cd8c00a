"""Who the manager lets in, and how much it says about strangers: its own resource limits.

Anyone who can reach the port can open connections.  Unchecked, about a thousand idle ones use
up the process's descriptors (often 1024): accept() fails, the loop spins on the still-ready
listening socket writing a warning each turn, and finished tasks' outputs cannot be written.
So the server (server.py) asks here:

- at most MAX_UNAUTHENTICATED connections wait in their handshake; a newer one closes the
  oldest once that one had EVICT_AFTER seconds to answer and no handshake ended for as long (a
  real worker answers within a round trip, an idle stranger never does: closing the oldest keeps
  the door open for workers, where refusing the newest would let strangers hold it).  Otherwise
  accept() waits (the listening sockets leave the selector until a handshake ends or that time
  passes): the rest of a pilot's thousands of ranks connecting in the same second stay in the
  kernel's listen backlog instead of being accepted and closed at once by the next ones (each
  would reconnect: a storm), and while handshakes keep ending -- workers, not strangers, hold
  the slots -- none is closed for being slow on a loaded node;
- all connections together stay FD_RESERVE descriptors below the open-file limit, so outputs,
  fetched files and the journal can always be opened;
- when accept() fails for lack of descriptors (EMFILE, ENFILE...) or the cap is reached, the
  listening sockets are left out of the selector for ACCEPT_PAUSE seconds instead of spinning;
- strangers' closes are logged one by one only LOG_BURST times per LOG_INTERVAL; the rest are
  counted and said in one summary line.
"""
from __future__ import annotations

import collections
import resource

MAX_UNAUTHENTICATED = 64
EVICT_AFTER = 1.0         # seconds without a handshake ending before the oldest may be closed for a newer one
FD_RESERVE = 64
ACCEPT_PAUSE = 1.0
LOG_BURST = 10
LOG_INTERVAL = 10.0


def connection_cap() -> int:
    """How many connections the process may hold, leaving FD_RESERVE descriptors free."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(16, soft - FD_RESERVE - 32)   # (32: the loop's own: selector, wake-up pair, journal...)


class Admission:
    def __init__(self, cap: int | None = None):
        self.cap = connection_cap() if cap is None else cap
        self.waiting = collections.OrderedDict()     # peers in their handshake -> arrival, oldest first
        self.held = False                            # accept() waits for a handshake to end or age
        self.last_done = float("-inf")               # when a handshake last ended (authenticated)
        self.paused_until = None                     # accept() is off until then (monotonic)
        self.logged = 0                              # strangers' closes logged in this interval
        self.unlogged = collections.Counter()        # reason -> closes not logged in this interval
        self.interval_end = 0.0

    # ---------------------------------------------------------------- accepting
    def room(self, n_connections: int) -> bool:
        """May one more connection be accepted now?"""
        return n_connections < self.cap

    def handshake_room(self, now: float) -> bool:
        """May one more connection start its handshake now?  No while MAX_UNAUTHENTICATED are in
        theirs, unless the oldest had EVICT_AFTER seconds and no handshake ended in that time
        (`held`: may_listen says when to try again)."""
        if len(self.waiting) < MAX_UNAUTHENTICATED:
            return True
        if next(iter(self.waiting.values())) <= now - EVICT_AFTER and self.last_done <= now - EVICT_AFTER:
            return True         # nobody answers: strangers hold the slots, close the oldest
        self.held = True
        return False

    def may_listen(self, now: float) -> bool:
        """Should the listening sockets be in the selector again (a pause over; a handshake
        ended or aged while accept() was held)?"""
        if self.paused_until is not None and not self.resume_due(now):
            return False
        if self.held:
            if not self.handshake_room(now):
                return False
            self.held = False
        return True

    def arrived(self, peer, now: float = 0.0):
        """A connection was accepted; returns the peer to close to make room for it, or None."""
        self.waiting[peer] = now
        if len(self.waiting) > MAX_UNAUTHENTICATED:
            oldest, _ = self.waiting.popitem(last=False)
            return oldest
        return None

    def authenticated(self, peer, now: float | None = None) -> None:
        self.waiting.pop(peer, None)
        if now is not None:
            self.last_done = now

    def gone(self, peer) -> None:
        self.waiting.pop(peer, None)

    def pause(self, now: float) -> None:
        self.paused_until = now + ACCEPT_PAUSE

    def resume_due(self, now: float) -> bool:
        """True once when a pause is over."""
        if self.paused_until is not None and now >= self.paused_until:
            self.paused_until = None
            return True
        return False

    # ---------------------------------------------------------------- saying so
    def should_log(self, reason: str, now: float) -> bool:
        """Log this stranger's close on its own line?  If not, it is counted for the summary."""
        if now >= self.interval_end and not self.unlogged:
            self.interval_end = now + LOG_INTERVAL
            self.logged = 0
        if self.logged < LOG_BURST:
            self.logged += 1
            return True
        self.unlogged[reason.split(":")[0][:60]] += 1
        return False

    def summary(self, now: float):
        """Once an interval with unlogged closes is over: (count, {reason: count}) to log, else None."""
        if not self.unlogged or now < self.interval_end:
            return None
        counts, self.unlogged = dict(self.unlogged), collections.Counter()
        self.interval_end = now + LOG_INTERVAL
        self.logged = 0
        return sum(counts.values()), counts
