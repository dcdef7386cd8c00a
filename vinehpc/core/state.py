"""Manager core: tasks, workers and file replicas as a state machine.

`Core.handle(event, now)` takes one event (events.py) and returns the commands (commands.py)
the server is to carry out, in order.  No sockets, no threads, no clock, no file system:
names of manager-side inputs come with the Submit event (resolved on the user's thread; the
event is the task's TaskState, made there),
and a file made by a task is named by the server on request (ResolveFile -> FileResolved).
Per-task state is a TaskState (tasks.py); the user's Task gets its results when it is
returned (TaskFinished).
"""
from __future__ import annotations

import collections
import copy

from ..protocol.messages import attempt
from ..scheduler import make as make_policy
from . import events as ev
from . import transfers
from .categories import LEARNED, Category
from .commands import DropFunction, Drained, KillTask, ResolveFile, TaskFinished, UnlinkFile
from .placement import mark_moved, schedule, touch, unindex
from .tasks import EMPTY, TaskState, task_resources, transition
from .workers import NONE, RES, Blocklist, WorkerState


def input_names(task, resolve_local=True) -> list:
    """Per input of `task`: (cachename, size, is_temp), or None for a file a task makes (named
    later).  Reads and may hash files: call it on the user's thread (Manager.submit).  A task
    without inputs shares one empty tuple: a list each is 56 bytes and one more object for the
    garbage collector to walk per queued task (a million queued: issue 15)."""
    if not task.inputs:
        return ()
    out = []
    for f, _ in task.inputs:
        if f.kind == "file":
            out.append((f.cachename(), f.size(), False) if f.producer is None and resolve_local else None)
        else:
            out.append((f.cachename(), f.size() if f.kind == "buffer" else 0, f.kind == "temp"))
    return out


class Core:
    def __init__(self, *, policy="files"):
        self.policy = make_policy(policy) if isinstance(policy, str) else policy
        self.out = []                      # commands of the event being handled
        self.tasks = {}                    # tid -> TaskState, submitted and not yet handed back
        self.ready = collections.deque()   # tids whose inputs are available
        self.workers = {}                  # wid -> WorkerState
        self.waiters = collections.defaultdict(list)      # file key -> tids waiting for it
        self.producing = collections.defaultdict(set)     # file key -> tids that will write it
        # cachename -> wids holding a complete copy (temps; and every file a worker holds or was
        # sent, the sources of peer transfers -- transfers.py)
        self.replicas = collections.defaultdict(set)
        self.manager_copy = {}             # temp cachename -> local path (fetched)
        self.fetching = set()              # temp cachenames being fetched to the manager
        self.producer_of = {}              # temp cachename -> producing Task (to recreate it)
        self.names = {}                    # id of a file a task made -> (cachename, size), once resolved
        self.resolving = set()             # ids of files with a ResolveFile outstanding
        self.cat = collections.defaultdict(lambda: [0, 0.0])   # category -> [n, ema wall]
        self.categories = {}               # name -> Category (allocations learnt from measured use)
        self.slow_multiplier = {}          # category (None: every one) -> fast-abort multiplier
        self.wait_for_workers = 0          # dispatch nothing before this many workers joined (tune)
        self.max_worker_losses = 3         # a task running on this many different lost workers fails (tune)
        self.blocked = Blocklist(self._log)
        self.slow_counts = collections.Counter()      # worker -> tasks fast-aborted there
        self.unproduced = {}               # temp cachename -> why its producer failed
        self.reserved = None               # (wid, tid): a worker kept for a task no worker had room for
        self.levels = {}                   # workers with room by tasks outstanding (placement.touch)
        self.low = 0                       # at most the lowest of those levels
        self.stamp = 0                     # counts moves in that index (WorkerState.since)
        self.moved = {}                    # workers whose tasks ended since the last pass, in that order: touched then
        self.pass_left = None              # starts left to a pass cut into parts (Schedule.part), else None
        self.where = {}                    # cache name -> wids whose cache holds it (workers.Cached)
        self.top = 1                       # the prefetch factor the index was made with
        self.joins = 0
        self.counts = collections.Counter()
        self.n_running = 0
        self.tiny_out = 0                  # tiny tasks out on workers (placement.TINY_BUDGET)
        self.cores = 0                     # the joined workers' cores (placement: how far ahead to send)
        self.drain_deadline = None         # set by Drain: dispatch stopped, running tasks get until then
        self._drain_grace = None
        self.drained = False
        self._recovery_ids = -1
        self._recovery_of = {}             # id of a hidden re-run of a producer -> the producer's id
        self.transfers = transfers.Transfers()   # worker-to-worker transfers (transfers.py)
        self._handlers = {
            TaskState: self._submit, ev.Resumed: self._resumed, ev.Cancel: self._cancel, ev.Drain: self._drain,
            ev.WorkerJoined: self._worker_joined, ev.WorkerLost: self._worker_lost,
            ev.TaskResult: self._task_result, ev.TasksStarted: self._tasks_started, ev.FileCached: self._file_cached, ev.FileFetched: self._file_fetched,
            ev.FileResolved: self._file_resolved, ev.PutFailed: self._put_failed,
            ev.FileDropped: self._file_dropped,
            ev.FetchFailed: self._fetch_failed, ev.BlockHost: self._block_host,
            ev.UnblockHost: lambda e, now: self.blocked.unblock(e.host),
            ev.SlowMultiplier: lambda e, now: self.slow_multiplier.__setitem__(e.category, e.multiplier),
            ev.ForgetFunction: self._forget_function, ev.Tick: self._tick, ev.Schedule: self._schedule,
            ev.Undeclare: self._undeclare,
            ev.TransferDone: lambda e, now: transfers.done(self, e.cachename, e.wid, e.ok, now, e.size, e.secs, e.reason,
                                                           e.mine),
        }

    def handle(self, event, now) -> list:
        """Take one event at time `now` (monotonic seconds); return the commands it leads to."""
        self._handlers[type(event)](event, now)
        out = self.out
        if out:
            self.out = []
        return out

    # ------------------------------------------------------------------ helpers
    def _log(self, event, **kw):
        # the record is the journal's once written (it is not copied there): a value that changes
        # later -- a task's resources, a worker's totals -- is passed as a copy.  The command is
        # the record itself (commands.py)
        kw["event"] = event
        self.out.append(kw)

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

    def worker_list(self) -> list:
        return [{"id": w.wid, "host": w.host, "resources": dict(w.total), "running": len(w.tasks),
                 "cached": len(w.cached), "port": w.info.get("port")} for w in self.workers.values()]

    def category(self, name) -> Category:
        c = self.categories.get(name)
        if c is None:
            c = self.categories[name] = Category(name, "fixed")
        return c

    def _largest(self, k) -> int:
        return max((w.total[k] for w in self.workers.values()), default=0)

    def _allocate(self, ts):
        """ts.res for its next attempt: what it asked for, or what its category decides now."""
        task = ts.task
        cat = self.category(task.category)
        res = task_resources(task)
        ts.whole = EMPTY
        if cat.mode != "fixed":
            alloc = cat.allocation({k: task.resources[k] for k in LEARNED})
            whole = set()
            for k in LEARNED:
                if alloc[k] is None:
                    whole.add(k)              # no guess yet: a whole worker's worth
                    res[k] = 0
                else:
                    res[k] = int(alloc[k])
            ts.whole = whole or EMPTY
        ts.res = res

    def _grow(self, ts, exhausted, used) -> bool:
        """Enlarge the resource the last attempt ran out of; False when nothing larger can be given."""
        if exhausted not in LEARNED:
            return False
        cat = self.category(ts.task.category)
        bigger = cat.larger(exhausted, ts.res[exhausted] or self._largest(exhausted), used)
        if bigger is None or bigger > self._largest(exhausted):
            return False
        ts.res[exhausted] = int(bigger)
        if exhausted in ts.whole:         # (only a task's own set holds anything)
            ts.whole.discard(exhausted)
        ts.grown = True
        return True

    # ------------------------------------------------------------------ the one requeue
    def _requeue(self, ts, front, avoid=None):
        """A task whose attempt ended (released) goes back to the queue: a whole-worker resource is
        decided again where it lands, not kept at the last worker's size."""
        ts.wid = None
        for k in ts.whole:
            ts.res[k] = 0
        if avoid is not None:
            ts.avoid = avoid
        transition(ts, "ready")
        if front:
            self.ready.appendleft(ts.tid)
        else:
            self.ready.append(ts.tid)

    def _release(self, ts):
        """The attempt running on ts.wid ended (result, kill, worker lost): give its share back."""
        self.n_running -= 1
        if ts.tiny:
            ts.tiny = False
            self.tiny_out -= 1
        w = self.workers.get(ts.wid)
        if w is None:
            return
        tasks = w.tasks
        if ts.tid in tasks:
            tasks.remove(ts.tid)
            if not tasks:
                w.tasks = NONE  # an idle worker holds no set (workers.NONE)
        w.outstanding -= 1
        for k in RES:
            w.committed[k] -= ts.res[k]
        mark_moved(self, w)     # its place in the index: once, at the next pass (placement.touch_moved)

    # ------------------------------------------------------------------ user events
    def _submit(self, ts, now, front=False):
        """A new task: the event is its TaskState (events.Submit)."""
        task = ts.task
        self.tasks[task.id] = ts
        if task.id >= 0:
            self.counts["submitted"] += 1
        for f, _ in task.outputs:
            k = self._key(f)
            self.producing[k].add(task.id)
            if f.kind == "temp":
                self.producer_of[k] = task
            else:
                self.names.pop(k, None)        # to be made again: named again
        self._log("submitted", task=task.id, kind=type(task).__name__, category=task.category,
                  tag=task.tag, resources=dict(ts.res), command=_what(task))
        self._make_ready_or_wait(ts, front=front)

    def _resumed(self, e, now):
        task = e.task
        ts = self.tasks[task.id] = ev.Submit(task, (), on_done=e.on_done)    # (no inputs: it does not run)
        self.counts["submitted"] += 1
        for f, _ in task.outputs:
            if f.kind == "temp":
                self.producer_of[f.cachename()] = task
        self._log("resumed", task=task.id, key=getattr(task, "_key", None))
        self._finish(ts, "success", "completed in an earlier run", resumed=True)

    def _cancel(self, e, now):
        ts = self.tasks.get(e.tid)
        if ts is None:
            return
        if ts.state == "running":
            self.out.append(KillTask(ts.wid, ts.tid))
            self._release(ts)
        self._finish(ts, "cancelled", e.reason)

    def _undeclare(self, e, now):
        """Forget every worker's copy of a file and tell them to drop it (a task that still
        needs it gets it sent again)."""
        n = e.cachename
        self.replicas.pop(n, None)
        for w in self.workers.values():
            if n in w.cached:
                w.cached.discard(n)
                self.out.append(UnlinkFile(w.wid, n))
        self._log("undeclared", file=n)

    def _drain(self, e, now):
        if self.drain_deadline is None:
            self.drain_deadline = now + e.grace
            self._drain_grace = e.grace
            self._log("draining", grace=e.grace, running=self.n_running, waiting=len(self.tasks) - self.n_running)

    def _end_drain(self, now):
        """No task starts while draining; once none runs (or the grace is over) the run stops."""
        if self.n_running and now < self.drain_deadline:
            return
        left = [ts for ts in self.tasks.values() if ts.state == "running"]
        for ts in left:
            self._cut(ts, "cut by the walltime: still running when the %g s grace ended" % self._drain_grace)
        self._log("drained", cut=[ts.tid for ts in left], **{"not run": len(self.tasks)})
        self.drained = True
        self.out.append(Drained())

    def _cut(self, ts, reason):
        """Stop a running task without a result (the walltime's grace ended): it goes back to the
        queue, which a draining core never dispatches from, so it is "not run" like the tasks that
        never started -- not returned by wait(), run by a resubmission -- never a user failure."""
        self.out.append(KillTask(ts.wid, ts.tid))
        self._log("not run", task=ts.tid, worker=ts.wid, reason=reason, category=ts.task.category,
                  cores=ts.res["cores"])
        self._release(ts)
        self._requeue(ts, front=True)

    def _block_host(self, e, now):
        self.blocked.block(e.host, now, seconds=e.seconds, why=e.why)

    # ------------------------------------------------------------------ readiness
    def _make_ready_or_wait(self, ts, front=False):
        task = ts.task
        for f, _ in task.inputs:
            if not self._available(f):
                k = self._key(f)
                if f.kind == "temp" and not self.producing.get(k):
                    if k in self.unproduced:
                        self._finish(ts, "input missing", "temp file %s was not produced: %s" % (k, self.unproduced[k]))
                        return
                    if not self._recreate(f):
                        self._finish(ts, "input missing", "temp file %s is lost and its producer is unknown" % k)
                        return
                self._wait(ts, k)
                return
        names = ts.inputs
        for i, n in enumerate(names):
            if n is None:                      # made by a task, and made by now: named on the I/O side
                f = task.inputs[i][0]
                got = self.names.get(f.id)
                if got is None:
                    if f.id not in self.resolving:
                        self.resolving.add(f.id)
                        self.out.append(ResolveFile(f))
                    self._wait(ts, ("name", f.id))
                    return
                names[i] = (got[0], got[1], False)
        transition(ts, "ready")
        if front:
            self.ready.appendleft(ts.tid)
        else:
            self.ready.append(ts.tid)

    def _wait(self, ts, key):
        transition(ts, "waiting")
        self.waiters[key].append(ts.tid)

    def _wake(self, key):
        for tid in self.waiters.pop(key, ()):
            ts = self.tasks.get(tid)
            if ts is not None and ts.state == "waiting":
                self._make_ready_or_wait(ts)

    def _recreate(self, f) -> bool:
        """A temp was lost with its worker(s): run its producer again (not shown to the user)."""
        prod = self.producer_of.get(f.cachename())
        if prod is None:
            return False
        clone = copy.copy(prod)
        clone.id = self._recovery_ids
        self._recovery_ids -= 1
        clone.outputs = [(g, r) for g, r in prod.outputs if g.kind == "temp"]
        self._log("recreate", task=prod.id, as_task=clone.id, file=f.cachename())
        self._recovery_of[clone.id] = prod.id
        # others already wait for it: first in line
        self._submit(ev.Submit(clone, input_names(clone, resolve_local=False)), 0.0, front=True)
        return True

    # ------------------------------------------------------------------ worker events
    def _worker_joined(self, e, now):
        w = self.workers[e.wid] = WorkerState(e.wid, e.info, self.where)
        self.joins += 1
        self.cores += w.total["cores"]
        w.order = self.joins
        touch(self, w)
        for n in w.cached:
            self.replicas[n].add(e.wid)
        self._log("worker joined", worker=e.wid, host=w.host, resources=dict(w.total), pid=e.info.get("pid"),
                  cached=len(w.cached), log=e.info.get("log"), port=e.info.get("port"), link=e.info.get("link"))

    def _forget_function(self, e, now):
        # w.fns keeps the fid: the worker keeps the bytes and reloads them if a call comes again
        for w in self.workers.values():
            if e.fid in w.fns:
                self.out.append(DropFunction(w.wid, e.fid))

    def _worker_lost(self, e, now):
        wid = e.wid
        w = self.workers.pop(wid, None)
        if w is None:
            return
        self.cores -= w.total["cores"]
        unindex(self, w)
        self._log("worker lost", worker=wid, host=w.host, reason=e.reason, tasks=sorted(w.tasks),
                  log=w.info.get("log"))
        for n in w.cached:
            s = self.replicas.get(n)
            if s is not None:
                s.discard(wid)
                if not s:
                    del self.replicas[n]
        w.cached.clear()       # out of the index of where files are
        transfers.worker_lost(self, wid, now)
        requeue = [self.tasks[t] for t in sorted(w.tasks) if t in self.tasks]
        # the loss counts against the tasks that ran there: one only sent ahead (a prefetch, its
        # start not reported) did not kill it -- an honest task requeued next to a poison one and
        # sent ahead with it three times failed "max retries".  With none known started, a start
        # report may have died with the worker: all of them count, as a poison task must
        ran = {ts.tid for ts in requeue if ts.started} or {ts.tid for ts in requeue}
        for ts in reversed(requeue):   # keep their order at the front of the queue
            cores = ts.res["cores"]        # before the requeue forgets a whole worker's worth
            self._release(ts)
            if ts.tid in ran:
                ts.lost_with = ts.lost_with | {wid}
            if len(ts.lost_with) >= self.max_worker_losses > 0:
                # a task that kills its worker (a kill of its parent, the OOM killer) would take
                # every worker in turn: as Dask's allowed-failures, it fails instead
                self._finish(ts, "max retries", "worker lost %d times while running this task" % len(ts.lost_with))
                continue
            self._requeue(ts, front=True)
            self._log("requeued", task=ts.tid, reason="worker %s lost: %s" % (wid, e.reason),
                      category=ts.task.category, cores=cores)

    def _file_cached(self, e, now):
        w = self.workers.get(e.wid)
        if w is not None:
            w.cached.add(e.cachename)
            transfers.done(self, e.cachename, e.wid, True, now, e.size)    # a put sent as a transfer

    def _file_fetched(self, e, now):
        self.fetching.discard(e.cachename)
        self.manager_copy[e.cachename] = e.path
        self._wake(e.cachename)

    def _file_resolved(self, e, now):
        self.resolving.discard(e.file_id)
        key = ("name", e.file_id)
        if e.error is not None:
            for tid in self.waiters.pop(key, ()):
                ts = self.tasks.get(tid)
                if ts is not None and ts.state == "waiting":
                    self._finish(ts, "input missing", e.error)
            return
        if not self.producing.get(e.file_id):      # not being made again meanwhile
            self.names[e.file_id] = (e.cachename, e.size)
        self._wake(key)

    def _put_failed(self, e, now):
        """A file could not be sent: the worker does not have it after all."""
        if transfers.put_failed(self, e.cachename, e.wid, now):
            return
        w = self.workers.get(e.wid)
        if w is not None:
            w.cached.discard(e.cachename)

    def _file_dropped(self, e, now):
        w = self.workers.get(e.wid)
        if w is None:
            return
        n = e.cachename
        w.cached.discard(n)
        s = self.replicas.get(n)
        if s is not None:
            s.discard(e.wid)
            if not s:
                del self.replicas[n]       # a temp left nowhere is made again when a task needs it
        transfers.dropped(self, n, e.wid, now)
        for tid in sorted(w.tasks):
            ts = self.tasks.get(tid)
            if ts is None or not any(x is not None and x[0] == n for x in ts.inputs):
                continue
            cores = ts.res["cores"]
            self.out.append(KillTask(e.wid, tid))
            self._release(ts)
            self._requeue(ts, front=True)
            self._log("requeued", task=tid, reason="worker %s dropped input %s: %s" % (e.wid, n, e.reason),
                      category=ts.task.category, cores=cores)

    def _fetch_failed(self, e, now):
        self.fetching.discard(e.cachename)

    def _tasks_started(self, e, now):
        self._started(e.wid, e.ids, e.att)

    def _started(self, wid, ids, att=None):
        """Tasks reported started on worker wid: `started` once per attempt, for tasks still
        running there (an id that is stale -- ended, requeued, elsewhere, or the start of an
        earlier attempt: `att` names the attempts after the first -- is ignored)."""
        for tid in ids:
            ts = self.tasks.get(tid)
            if (ts is not None and ts.wid == wid and ts.state == "running" and not ts.started
                    and ts.attempts == attempt(att and att.get(str(tid)))):
                ts.started = True
                self._log("started", task=tid, worker=wid, attempt=ts.attempts, queued=True)

    def _task_result(self, e, now):
        """A worker returned a task: e.info = {status, exit_code, reason, wall, stdout, temps...}.
        Starts riding on it (`started`) are logged after its end (the next task of its
        interpreter's lane started as this one returned).  This task's own start, when it rides
        on its own result, is not logged: the manager learns it with the end, at the same time,
        so a record would say nothing the ending one does not (its time minus `wall` is the
        start) and cost the I/O thread a quarter of a no-op task's journal (issue 15)."""
        self._result(e, now)
        started = e.info.get("started")
        if started:
            self._started(e.wid, started, e.info.get("started_att"))       # (this task's own id: no longer running, ignored)

    def _result(self, e, now):
        tid, wid, res = e.tid, e.wid, e.info
        ts = self.tasks.get(tid)
        if ts is None or ts.wid != wid or ts.state != "running" or attempt(res.get("att")) != ts.attempts:
            # (att: a result of an earlier attempt killed on this worker -- an input it held was
            # dropped -- sent before the kill arrived, read after the task was sent there again)
            self._log("stale result", task=tid, worker=wid, attempt=attempt(res.get("att")))
            return
        w = self.workers.get(wid)
        self._release(ts)
        get = res.get
        ts.worker = wid
        ts.exit_code = get("exit_code")
        ts.stdout = get("stdout") or ""     # a task that ran and printed nothing: "" (as TaskVine)
        ts.wall = wall = get("wall")
        ts.measured = get("measured")
        ts.output = e.output
        if w is not None:
            ts.host, ts.addr = w.host, w.info.get("addr")
            temps, sums = get("temps"), get("sums")
            if temps:
                for n in temps:
                    w.cached.add(n)
                    self.replicas[n].add(wid)
            if sums:
                for n, (size, digest) in sums.items():
                    self.transfers.temps[n] = (size, digest)
        else:
            ts.host = ts.addr = None
        status = get("status", "failed")
        category = ts.task.category
        cat = self.categories.get(category) or self.category(category)
        cat.record(ts.measured, ts.res, wall, status == "success", tid)
        if get("worker_fault"):
            if w is not None:
                self.blocked.fault(w, res.get("reason"), now)
            self._log("requeued", task=tid, reason="worker %s could not run it: %s" % (wid, res.get("reason")),
                      wall=ts.wall, category=ts.task.category, cores=ts.res["cores"])
            self._requeue(ts, front=False, avoid=wid)
            return
        if status == "resource exhaustion":
            cat.exhaustions += 1
            cat.retried.add(tid)
            x = res.get("exhausted") or {}
            what = x.get("resource")
            before = ts.res.get(what)
            used = x.get("used") if isinstance(x.get("used"), (int, float)) else None
            if what in LEARNED:
                cat.exhausted(what, used, ts.wall, task=tid)
            if ts.exhaustions < 8 and self._grow(ts, what, used):
                ts.exhaustions += 1
                self._log("retry larger", task=tid, worker=wid, resource=what, was=before, now=ts.res[what],
                          reason=res.get("reason"), wall=ts.wall, category=ts.task.category,
                          cores=before if what == "cores" else ts.res["cores"])
                self._requeue(ts, front=True)   # first in line: it has waited, and its kind learns from it
                return
        if status == "success":
            c = self.cat[category]
            c[0] += 1
            wall = float(wall or 0.0)
            c[1] = wall if c[0] == 1 else 0.8 * c[1] + 0.2 * wall
            self._finish(ts, "success", get("reason"))
            return
        if ts.tries < ts.task.retries:
            ts.tries += 1
            self._log("retry", task=tid, worker=wid, result=status, reason=res.get("reason"),
                      attempt=ts.tries, of=ts.task.retries, wall=ts.wall, category=ts.task.category,
                      cores=ts.res["cores"])
            self._requeue(ts, front=False)
            return
        if status == "failed" and ts.exit_code is not None and not res.get("signal"):
            # TaskVine's result: the command ran to its end ("success"); its code is in exit_code and
            # successful() is False. Retries were spent on it above all the same (vinehpc's choice).
            status = "success"
        self._finish(ts, status, res.get("reason"))

    def _tick(self, e, now):
        """Timers: fast abort of tasks running far longer than their category's mean."""
        if not self.slow_multiplier:
            return
        for ts in [t for t in self.tasks.values() if t.state == "running"]:
            category = ts.task.category
            mult = self.slow_multiplier.get(category, self.slow_multiplier.get(None))
            cat = self.categories.get(category)
            if not mult or cat is None or cat.wall_n < 3:
                continue
            mean = cat.wall_sum / cat.wall_n
            started = ts.dispatched_at
            if now - started <= mult * max(mean, 0.001):
                continue
            wid = ts.wid
            w = self.workers.get(wid)
            cores = ts.res["cores"]
            self.out.append(KillTask(wid, ts.tid))
            self._release(ts)
            self._requeue(ts, front=True, avoid=wid)
            self._log("fast abort", task=ts.tid, worker=wid, ran=round(now - started, 3), mean=round(mean, 3),
                      multiplier=mult, category=category, cores=cores)
            self.slow_counts[wid] += 1
            if w is not None and self.slow_counts[wid] >= 2:
                self.blocked.block(wid, now, why="2 tasks fast-aborted on worker %s (%s)" % (wid, w.host))

    def _schedule(self, e, now):
        left, self.pass_left = self.pass_left, None
        if self.drain_deadline is not None:
            if not self.drained:
                self._end_drain(now)
            return
        if len(self.workers) < self.wait_for_workers:
            return      # TaskVine's "wait-for-workers": dispatch nothing before that many joined
        schedule(self, now, e.part, left)

    # ------------------------------------------------------------------ handing back
    def _finish(self, ts, result, reason, resumed=False):
        """The task is done: its results go onto the user's Task, which is handed back."""
        transition(ts, "done")
        task = ts.task
        task.result = result
        task.reason = reason
        task.state = "done"
        res = ts.res
        task.resources_allocated = alloc = {k: res[k] for k in RES if res[k]}
        if not resumed:
            task.hostname = ts.host
            task.worker = ts.worker
            task.exit_code = ts.exit_code
            task.addrport = ts.addr
            task.std_output = ts.stdout
            task.wall_time = ts.wall
            task.resources_measured = ts.measured
            task.attempts = ts.attempts
            if ts.output is not None:
                task._result = ts.output
        self.tasks.pop(ts.tid, None)
        ok = result == "success" and not ts.exit_code     # Task.successful(): the journal's "done"
        if ts.tid >= 0:
            self.counts["done" if ok else "failed"] += 1
        if not resumed:
            # _log's record, written out: one a task, and the call with its twelve keywords cost
            # as much as building the record (the keys in the order the report reads: report/aggregate.py)
            self.out.append({"task": ts.tid, "worker": ts.wid, "result": result, "exit_code": ts.exit_code,
                             "reason": reason, "wall": ts.wall, "attempts": ts.attempts, "category": task.category,
                             "allocated": dict(alloc), "measured": dict(ts.measured) if ts.measured else ts.measured,
                             "output": _tail(ts.stdout, OUTPUT_KEPT[ok]),
                             "event": "done" if ok else "failed"})
        for f, _ in task.outputs:
            k = self._key(f)
            if not ok and f.kind == "temp":
                self.unproduced[k] = "task %s: %s" % (self._recovery_of.get(ts.tid, ts.tid), reason or result)
            s = self.producing.get(k)
            if s is not None:
                s.discard(ts.tid)
                if not s:
                    del self.producing[k]
                    self._wake(k)
        if ts.tid >= 0:
            self.out.append(TaskFinished(task, ts.on_done))
        else:
            self._recovery_of.pop(ts.tid, None)


# the end of a task's output kept in its journal record (`vinehpc logs --task`): more for a
# failure, which is what one looks up; little for a success, so a big run's journal stays small
OUTPUT_KEPT = {True: 256, False: 4096}


def _what(task) -> str:
    """What a task runs, for the journal: its command line, or a Python task's function name."""
    fn = getattr(task, "fn", None)
    what = task.command if fn is None else "%s()" % (getattr(fn, "__qualname__", None) or repr(fn))
    return _tail(what, 1000, head=True)


def _tail(text, n, head=False):
    if not text or len(text) <= n:
        return text
    return text[:n] + "..." if head else "..." + text[-n:]
