"""Manager core: tasks, workers and file replicas as a state machine.

Events are method calls (submit, worker_joined, task_done, worker_lost, ...) with the time
passed in; the commands that result are appended to `self.cmds` as tuples for the server
to carry out:

    ("fn", wid, fid, bytes)        send a function to a worker (once per worker)
    ("put", wid, file, cachename)  send a manager-side file/buffer/temp copy to a worker
    ("task", wid, task)            send a task (after its inputs, on the same connection)
    ("kill", wid, tid)             stop a task on a worker
    ("get", wid, cachename)        fetch a temp from a worker to the manager
    ("done", task)                 hand a finished task to the user
    ("log", dict)                  one journal record
"""
from __future__ import annotations

import collections

from ..scheduler import make as make_policy
from .categories import LEARNED, Category

SCAN_LIMIT = 256          # tasks looked at per scheduling pass (keeps a pass O(workers))
PREFETCH_FACTOR = 4       # a worker may hold up to this many times its cores of *short* tasks:
SHORT_TASK = 0.05         # x2 for a category faster than this (seconds),
TINY_TASK = 0.005         # x4 for one faster than this: round trips would idle the worker
SHORT_SAMPLES = 4
RESERVE_AFTER = 2.0        # seconds a task no worker has room for lets tasks behind it pass before a worker is kept for it

RES = ("cores", "memory", "disk", "gpus")


class WorkerState:
    __slots__ = ("wid", "host", "total", "committed", "tasks", "cached", "fns", "joined",
                 "outstanding", "info", "warned")

    def __init__(self, wid, info, now):
        self.wid = wid
        self.info = info
        self.host = info.get("host", "?")
        self.total = {k: int(info.get(k) or 0) for k in RES}
        self.committed = dict.fromkeys(RES, 0)
        self.tasks = set()
        self.cached = set(info.get("cached") or ())
        self.fns = set()
        self.joined = now
        self.outstanding = 0
        self.warned = False

    def __repr__(self):
        return "<worker %s %s %s>" % (self.wid, self.host, self.total)


def task_resources(task) -> dict:
    r = task.resources
    return {"cores": r["cores"] or 1, "memory": r["memory"] or 0, "disk": r["disk"] or 0, "gpus": r["gpus"] or 0}


class Core:
    def __init__(self, *, policy="files", names=None):
        """`names(file) -> (cachename, size)` resolves a manager-side file's content name."""
        self.policy = make_policy(policy) if isinstance(policy, str) else policy
        self.names = names or (lambda f: (f.cachename(), f.size()))
        self.cmds = []
        self.tasks = {}                    # tid -> Task, submitted and not yet handed back
        self.ready = collections.deque()   # tids whose inputs are available
        self.workers = {}                  # wid -> WorkerState
        self.waiters = collections.defaultdict(list)      # file key -> tids waiting for it
        self.producing = collections.defaultdict(set)     # file key -> tids that will write it
        self.replicas = collections.defaultdict(set)      # temp cachename -> wids holding it
        self.manager_copy = {}             # temp cachename -> local path (fetched)
        self.fetching = set()              # temp cachenames being fetched to the manager
        self.producer_of = {}              # temp cachename -> producing Task (to recreate it)
        self.cat = collections.defaultdict(lambda: [0, 0.0])   # category -> [n, ema wall]
        self.categories = {}               # name -> Category (allocations learnt from measured use)
        self.slow_multiplier = {}          # category (None: every one) -> fast-abort multiplier
        self.blocked = {}                  # host -> (until, why)
        self.slow_counts = collections.Counter()      # worker -> tasks fast-aborted there
        self.faults = {}                   # worker -> times of its recent worker-side failures
        self.unproduced = {}               # temp cachename -> why its producer failed
        self.reserved = None               # (wid, tid): a worker kept for a task no worker had room for
        self.counts = collections.Counter()
        self.n_running = 0
        self.draining = False
        self._recovery_ids = -1

    # ------------------------------------------------------------------ helpers
    def _log(self, event, **kw):
        kw["event"] = event
        self.cmds.append(("log", kw))

    @staticmethod
    def _key(f):
        return f.cachename() if f.kind == "temp" else f.id

    def _available(self, f) -> bool:
        if f.kind in ("buffer", "url"):
            return True
        if self.producing.get(self._key(f)):
            return False
        if f.kind == "temp":
            n = f.cachename()
            return bool(self.replicas.get(n)) or n in self.manager_copy
        return True

    def stats(self) -> dict:
        running = self.n_running
        return {"waiting": len(self.tasks) - running, "running": running,
                "workers": len(self.workers), "done": self.counts["done"],
                "failed": self.counts["failed"], "submitted": self.counts["submitted"]}

    # ------------------------------------------------------------------ events
    def category(self, name) -> Category:
        c = self.categories.get(name)
        if c is None:
            c = self.categories[name] = Category(name, "fixed")
        return c

    def _allocate(self, task, exhausted=None, used=None):
        """task._res for its next attempt: what it asked for, or what its category decides.
        `exhausted`: the resource its last attempt ran out of (go larger). Returns False when
        nothing larger can be given."""
        cat = self.category(task.category)
        res = task_resources(task) if exhausted is None else dict(task._res)
        task._whole = getattr(task, "_whole", set()) if exhausted is not None else set()
        if exhausted is not None:
            if exhausted not in LEARNED:
                return False
            bigger = cat.larger(exhausted, res[exhausted] or self._largest(exhausted), used)
            if bigger is None or bigger > self._largest(exhausted):
                return False
            res[exhausted] = int(bigger)
            task._whole.discard(exhausted)
        elif cat.mode != "fixed":
            alloc = cat.allocation({k: task.resources[k] for k in LEARNED})
            for k in LEARNED:
                if alloc[k] is None:
                    task._whole.add(k)           # no guess yet: a whole worker's worth
                    res[k] = 0
                else:
                    res[k] = int(alloc[k])
        task._res = res
        return True

    # ------------------------------------------------------------------ sick workers
    BLOCK_SECONDS = 300.0
    FAULTS_TO_BLOCK = 3

    def block_host(self, host, now, seconds=None, why="blocked by the user"):
        """Block a host name (every worker on it) or, given a worker id, that one worker."""
        if seconds == 0:
            until = float("inf")
        else:
            until = now + (self.BLOCK_SECONDS if seconds is None else seconds)
        self.blocked[host] = (until, why)
        self._log("host blocked", host=host, until=None if until == float("inf") else round(until, 3), reason=why)

    def unblock_host(self, host):
        if self.blocked.pop(host, None) is not None:
            self._log("host unblocked", host=host)

    def _blocked(self, host, now) -> bool:
        b = self.blocked.get(host)
        if b is None:
            return False
        if now >= b[0]:
            del self.blocked[host]
            self._log("host unblocked", host=host, reason="block expired")
            return False
        return True

    def tick(self, now):
        """Timers: fast abort of tasks running far longer than their category's mean."""
        if not self.slow_multiplier:
            return
        for task in [t for t in self.tasks.values() if t.state == "running"]:
            mult = self.slow_multiplier.get(task.category, self.slow_multiplier.get(None))
            cat = self.categories.get(task.category)
            if not mult or cat is None or cat.wall_n < 3:
                continue
            mean = cat.wall_sum / cat.wall_n
            started = getattr(task, "_dispatched_at", now)
            if now - started <= mult * max(mean, 0.001):
                continue
            wid = task._wid
            w = self.workers.get(wid)
            self.cmds.append(("kill", wid, task.id))
            self._release(task)
            task._wid = None
            task.state = "ready"
            task._avoid = wid
            self.ready.appendleft(task.id)
            self._log("fast abort", task=task.id, worker=wid, ran=round(now - started, 3), mean=round(mean, 3),
                      multiplier=mult)
            self.slow_counts[wid] += 1
            if w is not None and self.slow_counts[wid] >= 2:
                self.block_host(wid, now, why="2 tasks fast-aborted on worker %s (%s)" % (wid, w.host))

    FAULT_WINDOW = 300.0

    def _worker_fault(self, wid, why, now):
        """A failure that is the worker's, not the task's (cannot stage inputs, disk full...).
        Counted over a window whatever else succeeds there meanwhile: a worker that cannot
        stage files must not keep bouncing the tasks that need them."""
        times = self.faults.setdefault(wid, collections.deque())
        times.append(now)
        while times and times[0] < now - self.FAULT_WINDOW:
            times.popleft()
        w = self.workers.get(wid)
        if w is not None and len(times) >= self.FAULTS_TO_BLOCK:
            self.block_host(wid, now, why="%d worker-side failures within %.0f s on worker %s (%s), last: %s"
                            % (len(times), self.FAULT_WINDOW, wid, w.host, why))
            times.clear()

    def _largest(self, k) -> int:
        return max((w.total[k] for w in self.workers.values()), default=0)

    def submit(self, task, now, front=False):
        self.tasks[task.id] = task
        task._res = task_resources(task)
        task._whole = set()
        task._allocated = None       # decided when it is about to run: the category learns meanwhile
        task._wid = None
        task._tries = 0
        task._exhaustions = 0
        task._submit_time = now
        if task.id >= 0:
            self.counts["submitted"] += 1
        for f, _ in task.outputs:
            self.producing[self._key(f)].add(task.id)
            if f.kind == "temp":
                self.producer_of[f.cachename()] = task
        self._log("submitted", task=task.id, kind=type(task).__name__, category=task.category,
                  tag=task.tag, resources=task._res)
        self._make_ready_or_wait(task, front=front)

    def submit_resumed(self, task, now):
        """A task completed in an earlier run: known (its temps can be re-made), not run."""
        task._res = task_resources(task)
        task._wid = None
        task._tries = 0
        self.tasks[task.id] = task
        self.counts["submitted"] += 1
        for f, _ in task.outputs:
            if f.kind == "temp":
                self.producer_of[f.cachename()] = task
        self._log("resumed", task=task.id, key=getattr(task, "_key", None))
        self._finish(task, "success", "completed in an earlier run", resumed=True)

    def _make_ready_or_wait(self, task, front=False):
        for f, _ in task.inputs:
            if not self._available(f):
                k = self._key(f)
                if f.kind == "temp" and not self.producing.get(k):
                    if k in self.unproduced:
                        self._finish(task, "input missing", "temp file %s was not produced: %s" % (k, self.unproduced[k]))
                        return
                    if not self._recreate(f):
                        self._finish(task, "input missing", "temp file %s is lost and its producer is unknown" % k)
                        return
                task.state = "waiting"
                self.waiters[k].append(task.id)
                return
        task.state = "ready"
        if front:
            self.ready.appendleft(task.id)
        else:
            self.ready.append(task.id)

    def _recreate(self, f) -> bool:
        """A temp was lost with its worker(s): run its producer again (not shown to the user)."""
        prod = self.producer_of.get(f.cachename())
        if prod is None:
            return False
        import copy
        clone = copy.copy(prod)
        clone.id = self._recovery_ids
        self._recovery_ids -= 1
        clone._recovery_of = prod.id
        clone.outputs = [(g, r) for g, r in prod.outputs if g.kind == "temp"]
        self._log("recreate", task=prod.id, as_task=clone.id, file=f.cachename())
        self.submit(clone, 0.0, front=True)     # others already wait for it: first in line
        return True

    def cancel(self, tid, now=0.0, reason="cancelled by the user"):
        task = self.tasks.get(tid)
        if task is None:
            return False
        if task.state == "running":
            self.cmds.append(("kill", task._wid, tid))
            self._release(task)
        self._finish(task, "cancelled", reason)
        return True

    def cut(self, tid, now, reason):
        """Stop a running task without a result (the walltime's grace ended): it goes back to the
        queue, which a draining core never dispatches from, so it is "not run" like the tasks that
        never started -- not returned by wait(), run by a resubmission -- never a user failure."""
        task = self.tasks.get(tid)
        if task is None or task.state != "running":
            return False
        self.cmds.append(("kill", task._wid, tid))
        self._log("not run", task=tid, worker=task._wid, reason=reason)
        self._release(task)
        task._wid = None
        task.state = "ready"
        self.ready.appendleft(tid)
        return True

    def worker_joined(self, wid, info, now):
        w = self.workers[wid] = WorkerState(wid, info, now)
        for n in w.cached:
            if n.startswith("temp-"):
                self.replicas[n].add(wid)
        self._log("worker joined", worker=wid, host=w.host, resources=w.total, pid=info.get("pid"),
                  cached=len(w.cached))
        return w

    def worker_lost(self, wid, reason, now):
        w = self.workers.pop(wid, None)
        if w is None:
            return
        self._log("worker lost", worker=wid, host=w.host, reason=reason, tasks=sorted(w.tasks))
        for n in w.cached:
            s = self.replicas.get(n)
            if s is not None:
                s.discard(wid)
                if not s:
                    del self.replicas[n]
        requeue = [self.tasks[t] for t in sorted(w.tasks) if t in self.tasks]
        self.n_running -= len(requeue)
        for task in reversed(requeue):   # keep their order at the front of the queue
            task._wid = None
            for k in getattr(task, "_whole", ()):
                task._res[k] = 0         # "a whole worker" is decided again where it lands
            task.state = "ready"
            self._log("requeued", task=task.id, reason="worker %s lost: %s" % (wid, reason))
            self.ready.appendleft(task.id)
        w.tasks.clear()

    def file_cached(self, wid, cachename, size=0):
        """A worker reports it holds `cachename` (URL fetched, temp made)."""
        w = self.workers.get(wid)
        if w is not None:
            w.cached.add(cachename)

    def file_fetched(self, cachename, path):
        """A temp arrived at the manager (after a `get`): it is now available everywhere."""
        self.fetching.discard(cachename)
        self.manager_copy[cachename] = path
        self._wake(cachename)

    def put_failed(self, wid, cachename):
        """A file could not be sent: the worker does not have it after all."""
        w = self.workers.get(wid)
        if w is not None:
            w.cached.discard(cachename)

    def fetch_failed(self, cachename):
        self.fetching.discard(cachename)

    def task_done(self, wid, tid, res, now):
        """A worker returned task `tid`: res = {status, exit_code, reason, wall, stdout, temps...}."""
        task = self.tasks.get(tid)
        if task is None or task._wid != wid or task.state != "running":
            self._log("stale result", task=tid, worker=wid)
            return None
        w = self.workers.get(wid)
        self._release(task)
        task.hostname = w.host if w else None
        task.worker = wid
        task.exit_code = res.get("exit_code")
        task.std_output = res.get("stdout")
        task.wall_time = res.get("wall")
        task.resources_measured = res.get("measured")
        if w is not None:
            for n in res.get("temps") or ():
                w.cached.add(n)
                self.replicas[n].add(wid)
        status = res.get("status", "failed")
        cat = self.category(task.category)
        cat.record(task.resources_measured, task._res, task.wall_time, status == "success", task=tid)
        if res.get("worker_fault"):
            self._worker_fault(wid, res.get("reason"), now)
            self._log("requeued", task=tid, reason="worker %s could not run it: %s" % (wid, res.get("reason")))
            task._wid = None
            task.state = "ready"
            task._avoid = wid
            self.ready.append(tid)
            return None
        if status == "resource exhaustion":
            cat.exhaustions += 1
            cat.retried.add(tid)
            x = res.get("exhausted") or {}
            what = x.get("resource")
            before = task._res.get(what)
            used = x.get("used") if isinstance(x.get("used"), (int, float)) else None
            if what in LEARNED:
                cat.exhausted(what, used, task.wall_time, task=tid)
            if task._exhaustions < 8 and self._allocate(task, exhausted=what, used=used):
                task._exhaustions += 1
                task._allocated = True
                self._log("retry larger", task=tid, worker=wid, resource=what, was=before, now=task._res[what],
                          reason=res.get("reason"))
                task._wid = None
                task.state = "ready"
                self.ready.appendleft(tid)     # first in line: it has waited, and its kind learns from it
                return None
        if status == "success":
            c = self.cat[task.category]
            c[0] += 1
            wall = float(task.wall_time or 0.0)
            c[1] = wall if c[0] == 1 else 0.8 * c[1] + 0.2 * wall
            self._finish(task, "success", res.get("reason"))
            return task
        if task._tries < task.retries:
            task._tries += 1
            self._log("retry", task=tid, worker=wid, result=status, reason=res.get("reason"),
                      attempt=task._tries, of=task.retries)
            task._wid = None
            task.state = "ready"
            self.ready.append(tid)
            return None
        self._finish(task, status, res.get("reason"))
        return task

    # ------------------------------------------------------------------ internals
    def _finish(self, task, result, reason, resumed=False):
        task.result = result
        task.reason = reason
        task.state = "done"
        task.resources_allocated = {k: v for k, v in (getattr(task, "_res", None) or {}).items() if v}
        self.tasks.pop(task.id, None)
        ok = result == "success"
        if task.id >= 0:
            self.counts["done" if ok else "failed"] += 1
        if not resumed:
            self._log("done" if ok else "failed", task=task.id, worker=task._wid, result=result,
                      exit_code=task.exit_code, reason=reason, wall=task.wall_time, attempts=task.attempts,
                      category=task.category, allocated=task.resources_allocated,
                      measured=task.resources_measured)
        for f, _ in task.outputs:
            k = self._key(f)
            if not ok and f.kind == "temp":
                self.unproduced[k] = "task %s: %s" % (getattr(task, "_recovery_of", task.id), reason or result)
            s = self.producing.get(k)
            if s is not None:
                s.discard(task.id)
                if not s:
                    del self.producing[k]
                    self._wake(k)
        if task.id >= 0:
            self.cmds.append(("done", task))

    def _wake(self, key):
        for tid in self.waiters.pop(key, ()):
            t = self.tasks.get(tid)
            if t is not None and t.state == "waiting":
                self._make_ready_or_wait(t)

    def _release(self, task):
        w = self.workers.get(task._wid)
        if w is None:
            return
        w.tasks.discard(task.id)
        self.n_running -= 1
        w.outstanding -= 1
        for k in RES:
            w.committed[k] -= task._res[k]

    def short(self, category) -> bool:
        """Tasks of this category finish fast: worth sending ahead (prefetch, pipelining)."""
        c = self.cat.get(category)
        return bool(c and c[0] >= SHORT_SAMPLES and c[1] < SHORT_TASK)

    def _factor(self, category) -> int:
        c = self.cat.get(category)
        if not c or c[0] < SHORT_SAMPLES or c[1] >= SHORT_TASK:
            return 1
        return PREFETCH_FACTOR if c[1] < TINY_TASK else 2

    def _fits(self, w, task):
        r = task._res
        factor = self._factor(task.category)
        tot, com = w.total, w.committed
        for k in getattr(task, "_whole", ()):
            if com[k]:
                return False         # a whole worker's worth: only where none of it is taken
        for k in RES:
            need = r[k]
            if need and (need > tot[k] or com[k] + need > tot[k] * factor):
                return False
        return True

    def _too_big(self, task):
        return not any(self._fits_empty(w, task) for w in self.workers.values())

    # ------------------------------------------------------------------ scheduling
    def schedule(self, now):
        """Dispatch ready tasks to workers with room. Returns how many were dispatched."""
        if not self.ready or not self.workers or self.draining:
            return 0
        free = [w for w in self.workers.values() if w.committed["cores"] < w.total["cores"] * PREFETCH_FACTOR
                and not self._blocked(w.host, now) and not self._blocked(w.wid, now)]
        if not free:
            return 0
        n = 0
        skipped = []
        scanned = 0
        keep = self._reservation(now)
        passed = 0                       # skipped[:passed] are known to have been passed over
        while self.ready and free and scanned < SCAN_LIMIT:
            tid = self.ready.popleft()
            task = self.tasks.get(tid)
            if task is None or task.state != "ready":
                continue
            scanned += 1
            if self._temp_gone(task):
                self._make_ready_or_wait(task)   # waits for (and re-runs) the temp's producer
                continue
            if task._allocated is not True:
                # decided (again) as the category learns, until it is sent; a retry-larger is kept
                version = self.categories[task.category]._version if task.category in self.categories else 0
                if task._allocated != version:
                    self._allocate(task)
                    task._allocated = version
            cands = [w for w in free if (w.wid != keep or tid == self.reserved[1]) and self._fits(w, task)]
            avoid = getattr(task, "_avoid", None)
            if avoid is not None and len(cands) > 1:
                cands = [w for w in cands if w.wid != avoid] or cands   # elsewhere, if anywhere else
            if task._pin is not None:
                if task._pin not in self.workers:
                    self._finish(task, "failed", "worker %s, the only one this task may run on, is gone" % task._pin)
                    continue
                cands = [w for w in cands if w.wid == task._pin]
            holders = self._temp_holders(task)
            if holders is not None:
                near = [w for w in cands if w.wid in holders]
                if not near and cands:
                    self._fetch_temps(task)
                cands = near
            if not cands:
                skipped.append(tid)
                if self.workers and self._too_big(task) and not getattr(task, "_warned", False):
                    task._warned = True
                    self._log("warning", task=tid, reason="no connected worker is large enough for %s" % task._res)
                elif keep is None and holders is None:
                    since = getattr(task, "_passed_since", None)
                    if since is not None and now - since >= RESERVE_AFTER:
                        keep = self._reserve(task, now)
                continue
            if not self._resolve(task):
                continue
            w = self.policy.choose(task, cands)
            self._dispatch(task, w, now)
            task._passed_since = None
            for t in skipped[passed:]:   # a task behind them started: they were passed over
                t = self.tasks.get(t)
                if t is not None and getattr(t, "_passed_since", None) is None:
                    t._passed_since = now
            passed = len(skipped)
            if self.reserved is not None and self.reserved[1] == tid:
                self.reserved = keep = None
            n += 1
            if w.committed["cores"] >= w.total["cores"] * PREFETCH_FACTOR:
                free.remove(w)
        if skipped:
            self.ready.extendleft(reversed(skipped))
        return n

    def _reservation(self, now):
        """The worker kept for a task (None). A task no worker has room for lets tasks behind it
        pass (backfill) for RESERVE_AFTER seconds; then a worker is kept for it: while it drains, nothing
        else starts there, so a task bigger than what the others leave free (a retry after an
        exhaustion, a whole-worker guess, a 4-core task among 1-core ones) starts once that worker
        has room instead of when the queue runs dry. One at a time: the other workers keep
        backfilling."""
        if self.reserved is None:
            return None
        wid, tid = self.reserved
        w, task = self.workers.get(wid), self.tasks.get(tid)
        if (w is None or task is None or task.state != "ready" or self._blocked(w.host, now)
                or self._blocked(wid, now) or not self._fits_empty(w, task)):
            self.reserved = None
            return None
        return wid

    def _reserve(self, task, now):
        """Keep the emptiest worker that can hold `task` for it; returns its id (None: none can)."""
        ws = [w for w in self.workers.values() if self._fits_empty(w, task)
              and (task._pin is None or w.wid == task._pin)
              and not self._blocked(w.host, now) and not self._blocked(w.wid, now)]
        if not ws:
            return None
        w = min(ws, key=lambda w: sum(w.committed[k] / w.total[k] for k in RES if w.total[k]))
        self.reserved = (w.wid, task.id)
        self._log("reserved", task=task.id, worker=w.wid,
                  reason="no worker has room for %s now: worker %s takes no other task until it does"
                  % ({k: v for k, v in task._res.items() if v}, w.wid))
        return w.wid

    def _fits_empty(self, w, task) -> bool:
        return all(not task._res[k] or task._res[k] <= w.total[k] for k in RES)

    def _temp_gone(self, task) -> bool:
        """A temp input has no copy left anywhere (its workers were lost)."""
        for f, _ in task.inputs:
            if f.kind == "temp" and not self._available(f):
                return True
        return False

    def _temp_holders(self, task):
        """Workers that hold every temp input without a manager copy (None: no constraint)."""
        holders = None
        for f, _ in task.inputs:
            if f.kind == "temp":
                n = f.cachename()
                if n in self.manager_copy:
                    continue
                s = self.replicas.get(n, set())
                holders = set(s) if holders is None else holders & s
        return holders

    def _fetch_temps(self, task):
        for f, _ in task.inputs:
            if f.kind == "temp":
                n = f.cachename()
                if n in self.manager_copy or n in self.fetching or not self.replicas.get(n):
                    continue
                self.fetching.add(n)
                src = next(iter(self.replicas[n]))
                self.cmds.append(("get", src, n))
                self._log("fetch temp", file=n, worker=src, task=task.id)

    def _resolve(self, task) -> bool:
        """Content names of the inputs, taken now: a file made by an earlier task exists only now."""
        names = []
        for f, _ in task.inputs:
            if f.kind == "file":
                try:
                    n, size = self.names(f)
                except OSError as e:
                    self._finish(task, "input missing", "input file %r cannot be read: %s" % (f.source, e))
                    return False
            else:
                n, size = f.cachename(), f.size() if f.kind == "buffer" else 0
            names.append((n, size, f.kind == "temp"))
        task._input_names = names
        return True

    def _dispatch(self, task, w, now):
        task._dispatched_at = now
        for k in getattr(task, "_whole", ()):
            task._res[k] = w.total[k]
        for (f, remote), (n, size, _) in zip(task.inputs, task._input_names):
            if n not in w.cached:
                if f.kind == "url":
                    self._log("fetch url", worker=w.wid, file=n, url=f.source, task=task.id)
                else:
                    self.cmds.append(("put", w.wid, f, n))
                    self._log("put", worker=w.wid, file=n, size=size, task=task.id)
                if f.cache != "task":
                    w.cached.add(n)
        fid = getattr(task, "_fid", None)
        if fid is not None and fid not in w.fns:
            w.fns.add(fid)
            self.cmds.append(("fn", w.wid, fid, task._fbytes))
        task._wid = w.wid
        task.state = "running"
        task.attempts += 1
        w.tasks.add(task.id)
        self.n_running += 1
        w.outstanding += 1
        for k in RES:
            w.committed[k] += task._res[k]
        self.cmds.append(("task", w.wid, task))
        self._log("dispatched", task=task.id, worker=w.wid, host=w.host, attempt=task.attempts)
