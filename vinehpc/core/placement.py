"""Scheduling passes of the core: which ready task starts on which worker, and what that sends.

Functions of the Core (state.py) rather than methods so that each file holds one idea: the
core's events there, placement here.  Only Core.handle calls them (a Schedule event).
"""
from __future__ import annotations


from ..protocol.messages import start_reported
from . import transfers
from .commands import GetFile, PutFile, SendFunction, SendTask, TaskStarted
from .tasks import transition
from .workers import RES, added

SCAN_LIMIT = 256          # tasks passed over per scheduling pass (keeps a pass O(workers))
DISPATCH_LIMIT = 256      # tasks dispatched per pass: the thread gets back to its sockets (a long turn
                          # delays every result waiting to be read: wait() latency)
# Tasks that start count against their own limit, this many per worker with room: least loaded
# first spreads a pass over the fleet, so a pass of SCAN_LIMIT starts gave each of 1,000 workers
# one task per pass -- a message out and a result read per task, where 10 workers get several in
# each (issue 15: the manager's cost per task grew with the fleet).  Enough per worker that a
# refill goes as one message, bounded so that one loop turn stays O(workers).
# A pass starts at most max(DISPATCH_LIMIT, STARTS_PER_WORKER x workers); the fleet-sized prefetch
# (AHEAD_TASKS) bounds what is out at once, so wait() latency stays bounded too.
STARTS_PER_WORKER = 4
PREFETCH_FACTOR = 16      # a worker may hold up to this many times its cores of *short* tasks:
SHORT_TASK = 0.05         # x2 for a category faster than this (seconds),
TINY_TASK = 0.005         # up to x16 for one faster than this: round trips would idle the worker
SHORT_SAMPLES = 4
AHEAD_TASKS = 4096        # ...as long as the fleet holds about this many tiny tasks beyond its cores:
                          # enough to cover a round trip; more would only wait in sockets for the
                          # manager (wait() latency). x16 up to 273 cores, x5 at 1,000, x2 from 4,096
# Past SPREAD_CORES (273) cores, tiny tasks are not spread over the whole fleet, 2 a core (10,000 out
# on 5,000 one-core workers, a message each way for every task or two, and wait() at 0.5 s): at most
# TINY_BUDGET are out, a worker filled with a batch (up to PREFETCH_FACTOR times its cores, no more
# than a SPREAD_CORES-th of the queue) before the next is taken, so each message carries a batch each way.
# Below SPREAD_CORES the same batches, without the budget: one by one to the least loaded, a pass's
# starts (4 a worker) went 4 or 5 to each message on 100 workers, against 16 on 10.
# A fleet that large is never what tiny tasks wait for: the manager is (issue 15).
SPREAD_CORES = AHEAD_TASKS // (PREFETCH_FACTOR - 1)
TINY_BUDGET = PREFETCH_FACTOR * SPREAD_CORES     # what 273 cores hold: the largest spread fleet's
HELD_LIMIT = 16           # tiny tasks over the budget a pass looks at before it ends (more would wait all the same)
RESERVE_AFTER = 2.0        # seconds a task no worker has room for lets tasks behind it pass before a worker is kept for it


def _factor(core, category) -> int:
    """How many times its cores of this category a worker may hold: above 1 for a category whose
    tasks finish fast (short: worth sending ahead, the worker queues or pipelines them)."""
    c = core.cat.get(category)
    if not c or c[0] < SHORT_SAMPLES or c[1] >= SHORT_TASK:
        return 1
    return _tiny_factor(core) if c[1] < TINY_TASK else 2


def _tiny_factor(core) -> int:
    """How many times its cores of tiny tasks a worker holds, in this fleet (AHEAD_TASKS); past
    SPREAD_CORES, PREFETCH_FACTOR: the fleet holds TINY_BUDGET of them, in batches."""
    if core.cores > SPREAD_CORES:
        return PREFETCH_FACTOR
    return max(2, min(PREFETCH_FACTOR, 1 + AHEAD_TASKS // max(1, core.cores)))


def _top_factor(core) -> int:
    """The largest factor any ready task can have: a worker with that many times its cores
    committed has room for none (every task takes a core), so a pass does not look at it."""
    if len(core.cat) > 64:
        return _tiny_factor(core)   # not worth the walk: the bound that always holds
    return max((_factor(core, c) for c in core.cat), default=1)


def _fits(w, ts, factor):
    r = ts.res
    tot, com = w.total, w.committed
    for k in ts.whole:
        if com[k]:
            return False         # a whole worker's worth: only where none of it is taken
    for k in RES:
        need = r[k]
        if need and (need > tot[k] or com[k] + need > tot[k] * factor):
            return False
    return True


# ---------------------------------------------------------------- the index of workers with room
# The workers with room (committed cores below their cores times the largest prefetch factor,
# `core.top`), by load: `core.levels[k]` holds those with k tasks outstanding (wid -> worker, in
# the order they came to that load, `WorkerState.since`), `core.low` is at most the lowest k held.
# A dispatch takes the first worker that fits from the lowest level up: O(1) in the number of
# workers, where a heap of them was O(log N) (issue 15).  A worker is in one level or none
# (`WorkerState.hkey`: its level; None when it has no room), moved by touch().  The policies break
# ties in load the same way (scheduler/): the one longest at that load, join order at first.

def touch(core, w):
    """Worker w's load or room changed (a dispatch, a release, it joined): its place in the index.

    A worker that filled its room with tasks sent ahead (a prefetch factor above 1) comes back
    only once half of those are done, not at each result: least loaded first would otherwise
    refill it a task at a time, one message each way per task, however many it holds (issue 15).
    It still holds tasks it has not started, so its cores do not wait for the refill."""
    cores = w.total["cores"]
    committed = w.committed["cores"]
    room = cores * core.top
    if committed >= room:
        unindex(core, w)
        w.full = core.top > 1
    elif w.full and 2 * committed > room + cores:
        return                  # still more than half of what it was sent ahead to do
    else:
        w.full = False
        key = w.outstanding
        if w.hkey != key:
            unindex(core, w)
            w.hkey = key
            core.stamp += 1
            w.since = core.stamp
            level = core.levels.get(key)
            if level is None:
                level = core.levels[key] = {}
            level[w.wid] = w
            if key < core.low:
                core.low = key


def unindex(core, w):
    """w leaves the index (no room, lost, or being filled with a batch until the next pass)."""
    key = w.hkey
    if key is not None:
        w.hkey = None
        level = core.levels.get(key)
        if level is not None:
            level.pop(w.wid, None)
            if not level:
                del core.levels[key]


def mark_moved(core, w):
    """w is to be touched at the next pass (touch_moved), after the workers marked before it: the
    order of their last marks, as if each had been touched at once (ties in load go to the first)."""
    moved = core.moved
    moved.pop(w, None)
    moved[w] = None


def touch_moved(core):
    """touch() the workers whose tasks ended since the last pass, once each: a worker whose
    results came several in one read (most often, on a large fleet) was moved in the index once
    per result (issue 15).  Only a pass reads the index, so it is current whenever one is made."""
    moved, core.moved = core.moved, {}
    workers = core.workers
    for w in moved:
        if workers.get(w.wid) is w:     # (not lost since)
            touch(core, w)


def _reindex(core):
    core.levels = {}
    core.low = 0
    for w in sorted(core.workers.values(), key=lambda w: (w.hkey is None, w.since)):   # (ties keep their order)
        w.hkey = None
        touch(core, w)


def _any_open(core) -> bool:
    """Is some worker in the index?"""
    return bool(core.levels)


def _least_loaded_fit(core, ts, factor, keep, now):
    """The worker a least-loaded policy would choose among all those that fit ts: the fewest
    outstanding tasks, among equals the one longest at that load (FCFS's and "files"' choice
    without inputs).  Most often the first of the lowest level: O(1) in the number of workers."""
    levels = core.levels
    if not levels:
        return None
    low = core.low
    while low not in levels:        # (levels: at most the deepest prefetch of a worker, not N)
        low += 1
    core.low = low
    blocked = core.blocked
    for level in _upward(levels, low):
        for w in level.values():
            if w.wid != keep and _fits(w, ts, factor) and not blocked(w, now):
                return w
    return None


def _upward(levels, low):
    """The levels from the lowest (`low`, held) up; the others sorted only when the lowest has no fit."""
    yield levels[low]
    for k in sorted(levels):
        if k > low:
            yield levels[k]


def _holding_fit(core, ts, factor, keep, now) -> list:
    """The workers with room that hold some input of ts and fit it, in join order: under a policy
    that `prefers_holders`, its choice is among them when there are any (O(holders), not O(N))."""
    workers, where = core.workers, core.where
    seen = set()
    out = []
    for n in ts.inputs:
        for wid in where.get(n[0], ()):
            if wid in seen:
                continue
            seen.add(wid)
            w = workers.get(wid)
            if (w is not None and w.hkey is not None and wid != keep and _fits(w, ts, factor)
                    and not core.blocked(w, now)):
                out.append(w)
    out.sort(key=lambda w: w.order)
    return out


def fits_empty(w, ts) -> bool:
    r = ts.res
    return all(not r[k] or r[k] <= w.total[k] for k in RES)


def schedule(core, now, part=0, left=None) -> int:
    """Dispatch ready tasks to workers with room. Returns how many were dispatched.

    `part`: stop after that many starts, leaving what is left of the pass's starts in
    core.pass_left; `left`: those of the pass this one goes on with.  Why: a pass on a large fleet
    starts thousands of tasks, and each start's commands (its message, its records) waited for
    the end of the pass to be carried out: many thousand objects alive at once, promoted by the
    garbage collector on their way, and full collections came more often the larger the fleet
    (issue 15).  A part's tasks passed over are taken again by the next part (each part passes
    over at most SCAN_LIMIT), the rest is the pass's as if it were whole."""
    if not core.ready or not core.workers or core.drain_deadline is not None:
        return 0
    blocked = core.blocked
    if core.moved:
        touch_moved(core)
    top = _top_factor(core)
    if top != core.top:
        core.top = top
        _reindex(core)
    if not _any_open(core):
        return 0
    free = None          # the open workers in join order, made only for a task that needs them all
    least = getattr(core.policy, "least_loaded", None)
    holding = getattr(core.policy, "prefers_holders", False)
    n = 0
    skipped = []
    scanned = 0
    starts = max(DISPATCH_LIMIT, STARTS_PER_WORKER * len(core.workers)) if left is None else left
    if part and part < starts:
        starts, left = part, starts - part
    else:
        left = None
    keep = _reservation(core, now)
    passed = 0                       # skipped[:passed] are known to have been passed over
    # Task shapes (category, request, pin-free, no temps) that fit no free worker in this pass ->
    # "too big for every worker": within a pass room only shrinks, so the next task of a known
    # shape is passed over without trying every worker again (a queue of thousands of alike tasks
    # behind full workers was tried task by task on every loop turn).
    misses = {}
    # category -> its prefetch factor: it changes only with results, never within a pass
    factors = {}
    budget = core.cores > SPREAD_CORES      # tiny tasks: at most TINY_BUDGET out, a batch a worker
    stick, stuck = None, 0                  # the worker this pass fills with tiny tasks, and how many it got
    # a batch is a 273rd of the queue at most: a short queue is spread (its tasks run side by side), a
    # long one goes in full batches to as many workers as the spread fleet has
    share = max(1, len(core.ready) // SPREAD_CORES)
    held = set()                            # tiny tasks over the budget: not passed over, only not yet
    tasks, ready, categories = core.tasks, core.ready, core.categories
    while ready and scanned < SCAN_LIMIT and n < starts and _any_open(core):
        tid = ready.popleft()
        ts = tasks.get(tid)
        if ts is None or ts.state != "ready":
            continue
        scanned += 1
        task = ts.task
        category = task.category
        if task.inputs and _temp_gone(core, task):
            core._make_ready_or_wait(ts)   # waits for (and re-runs) the temp's producer
            continue
        if not ts.grown:
            # decided (again) as the category learns, until it is sent; a retry-larger is kept.
            # A fixed category learns nothing: its version moves with every result, its allocation never.
            c = categories.get(category)
            version = c._version if c is not None and c.mode != "fixed" else 0
            if ts.alloc_version != version:
                if ts.alloc_version is not None or (c is not None and c.mode != "fixed"):
                    core._allocate(ts)
                # (else a fixed category's first pass: ts.res is what the task asks, as submit made it)
                ts.alloc_version = version
        holders = _temp_holders(core, task) if task.inputs else None
        factor = factors.get(category)
        if factor is None:
            factor = factors[category] = _factor(core, category)
        # a tiny category's factor, in any fleet (below SPREAD_CORES too: 1 + AHEAD_TASKS // cores >= 16)
        tinycat = factor == PREFETCH_FACTOR
        tiny = budget and tinycat        # counted against TINY_BUDGET
        if tiny and core.tiny_out >= TINY_BUDGET:
            skipped.append(tid)
            held.add(tid)
            if len(held) >= HELD_LIMIT:
                break           # the budget frees as results come: the next passes take them
            continue
        shape = None
        if holders is None and ts.pin is None and ts.avoid is None and (keep is None or tid != core.reserved[1]):
            r = ts.res
            shape = (category, r["cores"], r["memory"], r["disk"], r["gpus"], tuple(ts.whole) if ts.whole else ())
        too_big = misses.get(shape)
        # in batches in any fleet: spread one by one to the least loaded, a queue of tiny tasks went out
        # 4 or 5 a message on 100 workers, against 16 on 10 (issue 15: the fleet's dip at 100)
        batch = tinycat and shape is not None and not task.inputs
        if (batch and stick is not None and stuck < share and stick.wid != keep and _fits(stick, ts, factor)
                and not blocked(stick, now)):
            cands = [stick]         # filled to its batch: one message for many tasks, each way
        elif too_big is None and shape is not None and (least is not None and least(ts) or holding):
            # the policy takes the least loaded worker with room (the first that fits in load
            # order), or one holding some of the task's inputs (found through the index of files)
            cands = _holding_fit(core, ts, factor, keep, now) if holding and ts.inputs else ()
            if not cands:
                w = _least_loaded_fit(core, ts, factor, keep, now)
                cands = [w] if w is not None else []
            if not cands:
                too_big = misses[shape] = not any(fits_empty(w, ts) for w in core.workers.values())
        elif too_big is None:
            if free is None:
                free = [w for w in core.workers.values() if w.hkey is not None and not blocked(w, now)]
            cands = [w for w in free if (w.wid != keep or tid == core.reserved[1]) and _fits(w, ts, factor)]
            if ts.avoid is not None and len(cands) > 1:
                cands = [w for w in cands if w.wid != ts.avoid] or cands   # elsewhere, if anywhere else
            if ts.pin is not None:
                if ts.pin not in core.workers:
                    core._finish(ts, "failed", "worker %s, the only one this task may run on, is gone" % ts.pin)
                    continue
                cands = [w for w in cands if w.wid == ts.pin]
            if holders is not None:
                near = [w for w in cands if w.wid in holders]
                if not near and cands:
                    _fetch_temps(core, task)
                cands = near
            if not cands:
                too_big = not any(fits_empty(w, ts) for w in core.workers.values())
                if shape is not None:
                    misses[shape] = too_big
        else:
            cands = None       # a task of the same shape fit nowhere in this pass: neither does this one
        if not cands:
            skipped.append(tid)
            if not ts.warned and too_big:
                ts.warned = True
                core._log("warning", task=tid, reason="no connected worker is large enough for %s" % ts.res)
            elif keep is None and holders is None:
                since = ts.passed_since
                if since is not None and now - since >= RESERVE_AFTER:
                    keep = _reserve(core, ts, now)
                    if keep is not None:
                        misses.clear()      # that worker is now closed to the others
            continue
        w = cands[0] if len(cands) == 1 else core.policy.choose(ts, cands)
        scanned -= 1            # (a dispatch is not what makes a pass long: the tasks passed over are)
        # past SPREAD_CORES a worker being filled leaves the index until the next pass (one move in it a
        # batch; there are workers enough); a smaller fleet's stays in it, to be taken again in this pass
        _dispatch(core, ts, w, now, factor, not (batch and budget))
        if tiny:
            ts.tiny = True
            core.tiny_out += 1
        if batch:
            stuck = stuck + 1 if w is stick else 1
            stick = w
        ts.passed_since = None
        if len(skipped) > passed:
            for t in skipped[passed:]:   # a task behind them started: they were passed over
                t = tasks.get(t)
                if t is not None and t.passed_since is None and t.tid not in held:
                    t.passed_since = now
            passed = len(skipped)
        if core.reserved is not None and core.reserved[1] == tid:
            core.reserved = keep = None
            misses.clear()                  # the kept worker is open to every task again
        n += 1
        if free is not None and w.hkey is None:
            free.remove(w)
    if skipped:
        core.ready.extendleft(reversed(skipped))
    if left is not None and n >= starts:
        core.pass_left = left
    return n


def _reservation(core, now):
    """The worker kept for a task (None). A task no worker has room for lets tasks behind it
    pass (backfill) for RESERVE_AFTER seconds; then a worker is kept for it: while it drains, nothing
    else starts there, so a task bigger than what the others leave free (a retry after an
    exhaustion, a whole-worker guess, a 4-core task among 1-core ones) starts once that worker
    has room instead of when the queue runs dry. One at a time: the other workers keep
    backfilling."""
    if core.reserved is None:
        return None
    wid, tid = core.reserved
    w, ts = core.workers.get(wid), core.tasks.get(tid)
    if w is None or ts is None or ts.state != "ready" or core.blocked(w, now) or not fits_empty(w, ts):
        core.reserved = None
        return None
    return wid


def _reserve(core, ts, now):
    """Keep the emptiest worker that can hold the task for it; returns its id (None: none can)."""
    ws = [w for w in core.workers.values() if fits_empty(w, ts) and (ts.pin is None or w.wid == ts.pin)
          and not core.blocked(w, now)]
    if not ws:
        return None
    w = min(ws, key=lambda w: sum(w.committed[k] / w.total[k] for k in RES if w.total[k]))
    core.reserved = (w.wid, ts.tid)
    core._log("reserved", task=ts.tid, worker=w.wid,
              reason="no worker has room for %s now: worker %s takes no other task until it does"
              % ({k: v for k, v in ts.res.items() if v}, w.wid))
    return w.wid


def _temp_gone(core, task) -> bool:
    """A temp input has no copy left anywhere (its workers were lost)."""
    for f, _ in task.inputs:
        if f.kind == "temp" and not core._available(f):
            return True
    return False


def _temp_holders(core, task):
    """Workers that hold every temp input without a manager copy (None: no constraint).  A temp
    that can travel between workers constrains nothing: the scheduler prefers its holders
    (scheduler/files.py), and any other worker gets it from one of them."""
    holders = None
    for f, _ in task.inputs:
        if f.kind == "temp":
            n = f.cachename()
            if n in core.manager_copy or transfers.peerable(core, f, n):
                continue
            s = core.replicas.get(n, set())
            holders = set(s) if holders is None else holders & s
    return holders


def _fetch_temps(core, task):
    for f, _ in task.inputs:
        if f.kind == "temp":
            n = f.cachename()
            if n in core.manager_copy or n in core.fetching or not core.replicas.get(n):
                continue
            core.fetching.add(n)
            src = next(iter(core.replicas[n]))
            core.out.append(GetFile(src, n))
            core._log("fetch temp", file=n, worker=src, task=task.id)


def task_message(task, ts, pipe) -> dict:
    """The wire 'task' message for this attempt."""
    spec = task._spec()
    spec["id"] = task.id
    spec["inputs"] = [[n[0], remote, "image" if f.image else f.kind, f.cache, f.source if f.kind == "url" else f.image]
                      for (f, remote), n in zip(task.inputs, ts.inputs)] if task.inputs else ()
    spec["outputs"] = [[remote, f.kind, f.cachename() if f.kind == "temp" else None]
                       for f, remote in task.outputs] if task.outputs else ()
    if task.env:
        spec["env"] = task.env
    if task.watched:
        spec["watch"] = task.watched
    spec["res"] = ts.res      # not copied: the server encodes the message as soon as handle() returns
    if task.time_max:
        spec["time_max"] = task.time_max
    spec["category"] = task.category
    if pipe:
        spec["pipe"] = True
    if ts.attempts > 1:       # (the result echoes it: see state._result)
        spec["att"] = ts.attempts
    return spec


def _dispatch(core, ts, w, now, factor, index=True):
    """Start ts on w (`factor`: its category's prefetch factor, the pass's).  `index` False: w
    leaves the index until the next pass (it is being filled with a batch of tiny tasks: one
    move in the index for the batch, not one per task)."""
    task = ts.task
    out = core.out
    tid, wid = task.id, w.wid
    ts.dispatched_at = now
    res = ts.res
    for k in ts.whole:
        res[k] = w.total[k]
    hits = 0
    expect = []               # inputs the worker waits for: a transfer to it is on its way (or queued)
    if task.inputs:
        hits = _stage_inputs(core, task, ts, w, now, expect)
    fid = getattr(task, "_fid", None)
    if fid is not None and fid not in w.fns:
        w.fns = added(w.fns, fid)
        out.append(SendFunction(wid, fid, task._fbytes))
    ts.wid = wid
    transition(ts, "running")
    ts.attempts += 1
    w.tasks = added(w.tasks, tid)
    core.n_running += 1
    w.outstanding += 1
    # sent ahead (pipe: the worker may queue it or present it to a busy interpreter) only when it
    # does not fit in what the worker has free; one that fits starts on arrival (the worker frees
    # what its tasks held before the manager hears of it: it has at least this much room)
    room = True
    total, committed = w.total, w.committed
    for k in RES:
        need = res[k]
        if need:
            if committed[k] + need > total[k]:
                room = False
            committed[k] += need
    if index:
        touch(core, w)
    else:
        unindex(core, w)
        mark_moved(core, w)
    # sent ahead only for a short category (factor > 1)
    spec = task_message(task, ts, not room and factor > 1)
    if expect:
        spec["expect"] = expect
    out.append(SendTask(wid, tid, spec, task._abytes, task.outputs))
    if ts.on_start is not None:
        out.append(TaskStarted(task, ts.on_start))
    # cached: inputs the worker already had (the report's cache hits); left out when none
    if hits:
        core._log("dispatched", task=tid, worker=wid, host=w.host, attempt=ts.attempts, cached=hits)
    else:
        core._log("dispatched", task=tid, worker=wid, host=w.host, attempt=ts.attempts)
    # a task the worker has room for starts as it arrives: its start is logged now, no message;
    # one sent ahead (or waiting for a fetch, an image, a library slot) is reported by the worker
    ts.started = not start_reported(spec.get("pipe"), spec.get("slots"), spec["inputs"], expect)
    if ts.started:
        core._log("started", task=tid, worker=wid, attempt=ts.attempts, queued=False)


def _stage_inputs(core, task, ts, w, now, expect) -> int:
    """Send w the inputs of ts it lacks (or have them transferred to it); returns how many it had."""
    out = core.out
    hits = 0
    wants = core.transfers.wants
    for (f, remote), (n, size, _) in zip(task.inputs, ts.inputs):
        if n in w.cached:
            if (n, w.wid) in wants:
                expect.append(n)
            else:
                hits += 1
        else:
            if f.kind == "url":
                core._log("fetch url", worker=w.wid, file=n, url=f.source, task=task.id)
            elif transfers.peerable(core, f, n):
                expect.append(n)
                transfers.request(core, f, n, size, w, now)
            else:
                out.append(PutFile(w.wid, f, n, core.manager_copy.get(n) if f.kind == "temp" else None))
                if f.kind == "temp":       # its size as its producer measured it (the name says nothing)
                    size = core.transfers.temps.get(n, (size,))[0]
                core._log("put", worker=w.wid, file=n, size=size, task=task.id)
            if f.cache != "task":
                w.cached.add(n)
    return hits
