"""Who sends which file to which worker: peer transfers (a room of the core, no I/O).

A worker that needs an input gets it from a worker that holds a complete copy (`Core.replicas`:
cachename -> wids, the index that keeps a choice O(holders), never O(workers)), else from the
manager (or, for a temp, not at all: its producer runs again).  Each source serves at most
`limit` transfers at once (file_source_max_transfers: a cap, never a target); a request no source
can serve now waits in `waiting`, and every end of a transfer -- a new holder, a free slot --
starts what waits.  A worker still receiving a file is a source already (it serves what has
arrived and follows the rest), and the least busy source is chosen: a burst of requests for a
popular file becomes a chain (a tree when sources are busy) of streaming copies, every uplink
carrying one copy at its full rate instead of one source's split k ways.  The manager sends a
file's first copy and no second one while a copy is on its way: it is the source of last resort,
so its link carries one copy of an input, not one per worker.

Failures never fail a task or spend its retries: a transfer that failed (the source died,
stalled, refused, sent a corrupt copy: the fetching worker checks the digest) is asked again of
another holder, then of the manager; only when no copy is left anywhere are the tasks that
waited for it requeued (a temp's producer runs again, state.py).

Functions of the Core, like placement.py; `Transfers` is their state.
"""
from __future__ import annotations

from .commands import Fetch, KillTask, PutFile

MANAGER = "manager"       # the source of a copy the manager sends itself (PutFile with ack)
DEFAULT_LIMIT = 3         # transfers one source serves at once (file_source_max_transfers)
MAX_TRIES = 4             # failed transfers of one file to one worker before its tasks are requeued


class Want:
    """A worker waits for a file (or has a transfer of it in flight)."""
    __slots__ = ("file", "size", "digest", "level", "source", "since", "failed", "tries")

    def __init__(self, file, size, digest, level):
        self.file, self.size, self.digest, self.level = file, size, digest, level
        self.source = None        # wid or MANAGER while in flight
        self.since = 0.0
        self.failed = set()       # sources that failed this worker for this file
        self.tries = 0


class Transfers:
    __slots__ = ("enabled", "limit", "active", "flying", "arriving", "wants", "waiting", "temps")

    def __init__(self):
        self.enabled = True       # Manager.enable_peer_transfers / disable_peer_transfers
        self.limit = DEFAULT_LIMIT
        self.active = {}          # source -> transfers in flight from it
        self.flying = {}          # cachename -> transfers of it in flight
        # cachename -> workers receiving it now (from a worker or the manager): sources already (a
        # worker serves a copy as it arrives), so a file flows down a tree or chain without
        # waiting at each hop
        self.arriving = {}
        self.wants = {}           # (cachename, dest wid) -> Want (waiting or in flight)
        self.waiting = {}         # cachename -> {dest wid: None} (insertion-ordered) with no source yet
        self.temps = {}           # temp cachename -> (size, "sha256:HEX") its producer reported (plain files)


def peerable(core, f, n) -> bool:
    """Does this input travel by transfer?  Plain files kept beyond their task (named after their
    sha256, so a copy can be checked) and temps.  Not: buffers (they ride in one message), URLs
    (workers fetch them), directories and images (they travel as tars), task-level files (the
    worker drops them when the task ends: a holder would be gone before it could serve), files
    declared with peer_transfer=False."""
    if not core.transfers.enabled:
        return False
    if f.kind == "temp":
        return n in core.transfers.temps      # a plain file its producer measured (not a directory)
    return (f.kind == "file" and f.peer_transfer and f.image is None and f.cache != "task"
            and n.startswith("file-"))


def request(core, f, n, size, w, now) -> None:
    """Worker w needs file n (input `f`, `size` bytes): start a transfer or wait for a source."""
    t = core.transfers
    if (n, w.wid) in t.wants:
        return
    if f.kind == "temp":
        size, digest = t.temps[n]
    else:
        digest = "sha256:" + n[5:]          # file.py: a file's name is the sha256 of its content
    t.wants[(n, w.wid)] = Want(f, size, digest, f.cache)
    t.waiting.setdefault(n, {})[w.wid] = None
    _pump(core, n, now)


def _servers(core, n, dest, want):
    """Workers that can serve n to dest now, best first; and whether any could serve later (busy,
    not failed).  A worker still receiving n (from a worker or the manager) counts: it serves what
    has arrived and follows the rest.  Best: the same host, then the fewest transfers in flight
    -- links are the limit, and a source serving k copies gives each 1/k of its uplink, while a
    copy still arriving passes the file on at the full rate: a burst of requests becomes a chain
    of streaming copies, every uplink busy with one --, then a complete copy."""
    t = core.transfers
    host = core.workers[dest].host
    complete = core.replicas.get(n, ())
    ready, later = [], False
    for h in (*complete, *t.arriving.get(n, ())):
        w = core.workers.get(h)
        if h == dest or w is None or h in want.failed or not w.info.get("port"):
            continue
        if t.active.get(h, 0) < t.limit:
            ready.append(w)
        else:
            later = True
    ready.sort(key=lambda w: (w.host != host, t.active.get(w.wid, 0), w.wid not in complete, w.wid))
    if ready and t.active.get(dest):
        # dest serves n to others already (it is asked again after a failure): never a source
        # that receives n through dest, a cycle in which no byte would ever come
        ready = [w for w in ready if not _feeds(t, n, dest, w.wid, complete)]
    return ready, later


def _feeds(t, n, dest, h, complete) -> bool:
    """Does h receive n, through any number of hops, from dest?"""
    seen = set()
    while h not in complete and h not in seen:
        seen.add(h)
        want = t.wants.get((n, h))
        h = want.source if want is not None else None
        if h is None or h == MANAGER:
            return False
        if h == dest:
            return True
    return False


def _manager_can(core, want, n) -> bool:
    return want.file.kind == "file" or n in core.manager_copy


def _pump(core, n, now) -> None:
    """Start what can start of the transfers of n that wait."""
    t = core.transfers
    dests = t.waiting.get(n)
    if not dests:
        return
    for dest in list(dests):
        want = t.wants[(n, dest)]
        source = _source(core, n, dest, want)
        if source is not None:
            _start(core, n, dest, want, source, now)
        elif want.tries >= MAX_TRIES or not _could_serve(core, n, dest, want):
            _give_up(core, n, dest, "%d transfers failed" % want.tries if want.tries else "no copy is left")
    if not dests:
        t.waiting.pop(n, None)


def _source(core, n, dest, want):
    """The source for this transfer now (a wid or MANAGER), or None: wait (or give up, see
    _could_serve).  Another holder first, then the manager; holders that failed are tried again
    once nothing else is left."""
    t = core.transfers
    ready, later = _servers(core, n, dest, want)
    if ready:
        return ready[0].wid
    if later or t.flying.get(n):
        return None        # a holder will be free, or a copy on its way will be one: wait for it
    if _manager_can(core, want, n) and MANAGER not in want.failed:
        return MANAGER
    if want.failed and want.tries < MAX_TRIES:
        want.failed.clear()
        ready, _ = _servers(core, n, dest, want)
        if ready:
            return ready[0].wid
        if _manager_can(core, want, n):
            return MANAGER
    return None


def _could_serve(core, n, dest, want) -> bool:
    """Could anything still bring n to dest later (a holder alive, the manager, a copy on its way)?"""
    if core.transfers.flying.get(n) or _manager_can(core, want, n):
        return True
    return any(h != dest and h in core.workers for h in core.replicas.get(n, ()))


def _start(core, n, dest, want, source, now):
    t = core.transfers
    del t.waiting[n][dest]
    want.source, want.since = source, now
    want.tries += 1
    t.active[source] = t.active.get(source, 0) + 1
    t.flying[n] = t.flying.get(n, 0) + 1
    t.arriving.setdefault(n, set()).add(dest)
    if source == MANAGER:
        core.out.append(PutFile(dest, want.file, n, core.manager_copy.get(n) if want.file.kind == "temp" else None,
                                ack=True))
        core._log("put", worker=dest, file=n, size=want.size)
        return
    w = core.workers[source]
    core.out.append(Fetch(dest, n, w.info["addr"].rsplit(":", 1)[0].strip("[]"), w.info["port"], want.size,
                          want.level, want.digest))


def done(core, n, dest, ok, now, size=0, secs=None, reason=None, mine=False) -> None:
    """A transfer of n to dest ended (the worker's `fetched`, or its `cached` after a put).
    `mine`: dest could not store it: no other source is asked, its tasks come back from it as
    the worker's failures (run elsewhere, no retry spent)."""
    t = core.transfers
    want = t.wants.get((n, dest))
    if want is None or want.source is None:
        return
    source = want.source
    _release(t, n, source)
    _arrived(t, n, dest)
    record = {"file": n, "source": source, "dest": dest, "bytes": size if ok else 0,
              "secs": round(secs if secs is not None else now - want.since, 6)}
    if ok:
        del t.wants[(n, dest)]
        core._log("transfer", **record)
        w = core.workers.get(dest)
        if w is not None:
            core.replicas[n].add(dest)
            w.cached.add(n)
    elif mine:
        del t.wants[(n, dest)]
        core._log("transfer failed", reason=reason, **record)
    else:
        core._log("transfer failed", reason=reason, **record)
        want.source = None
        want.failed.add(source)
        t.waiting.setdefault(n, {})[dest] = None
    _pump_after(core, n, source, now)


def _release(t, n, source):
    for d, k in ((t.active, source), (t.flying, n)):
        v = d.get(k, 0) - 1
        if v > 0:
            d[k] = v
        else:
            d.pop(k, None)


def _arrived(t, n, dest):
    """dest no longer receives n (done, failed or lost)."""
    s = t.arriving.get(n)
    if s is not None:
        s.discard(dest)
        if not s:
            del t.arriving[n]


def _pump_after(core, n, source, now):
    """A slot of `source` is free (and n may have a new holder): start what waited for either."""
    _pump(core, n, now)
    for m in list(core.transfers.waiting):
        if m != n and (source == MANAGER or source in core.replicas.get(m, ())):
            _pump(core, m, now)


def worker_lost(core, wid, now) -> None:
    """Transfers to a lost worker are forgotten (their sources' slots freed).  One from it is left
    to its fetching worker, which reports it failed (reset, or stalled) and is then served by
    another source: asking again now would race that report."""
    t = core.transfers
    freed = set()
    for n, dest in [k for k in t.wants if k[1] == wid]:
        source = _forget_want(t, n, dest)
        if source is not None:
            freed.add((n, source))
    t.active.pop(wid, None)
    for n, source in freed:
        _pump_after(core, n, source, now)
    for n in [n for n, d in t.waiting.items() if not d]:
        del t.waiting[n]


def dropped(core, n, wid, now) -> None:
    """Worker wid dropped its copy of n (a task modified it): a transfer of n to it is over too,
    and the next task there that needs n asks for it again (from another holder, or the manager)."""
    t = core.transfers
    if (n, wid) in t.wants:
        source = _forget_want(t, n, wid)
        if source is not None:
            _pump_after(core, n, source, now)
        if not t.waiting.get(n, True):
            del t.waiting[n]


def _forget_want(t, n, dest):
    """The transfer of n to dest is no more: its source's slot is freed; returns that source
    (None: it had none yet, it only waited)."""
    want = t.wants.pop((n, dest))
    if want.source is None:
        t.waiting.get(n, {}).pop(dest, None)
        return None
    _release(t, n, want.source)
    _arrived(t, n, dest)
    return want.source


def _give_up(core, n, dest, reason):
    """No copy can reach dest: the tasks there that wait for n go back to the queue (not a
    retry: no task failed); a temp's producer then runs again (state.py, placement.py)."""
    t = core.transfers
    t.waiting[n].pop(dest, None)
    t.wants.pop((n, dest), None)
    w = core.workers.get(dest)
    if w is None:
        return
    w.cached.discard(n)
    for tid in sorted(w.tasks):
        ts = core.tasks.get(tid)
        if ts is None or not any(x is not None and x[0] == n for x in ts.inputs):
            continue
        core.out.append(KillTask(dest, tid))
        core._release(ts)
        core._requeue(ts, front=True)
        core._log("requeued", task=tid, reason="input %s could not be transferred to worker %s: %s" % (n, dest, reason),
                  category=ts.task.category, cores=ts.res["cores"])


def put_failed(core, n, dest, now) -> bool:
    """The manager could not read a file it was sending as a transfer: the tasks waiting for it
    fail "input missing" as they would have on the worker.  False: not a transfer."""
    want = core.transfers.wants.get((n, dest))
    if want is None or want.source != MANAGER:
        return False
    _release(core.transfers, n, MANAGER)
    _arrived(core.transfers, n, dest)
    del core.transfers.wants[(n, dest)]
    w = core.workers.get(dest)
    for tid in sorted(w.tasks) if w is not None else ():
        ts = core.tasks.get(tid)
        if ts is not None and any(x is not None and x[0] == n for x in ts.inputs):
            core.out.append(KillTask(dest, tid))
            core._release(ts)
            core._finish(ts, "input missing", "the manager could not read input %s" % n)
    return True
