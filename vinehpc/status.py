"""What a run is doing, from its journal records: the figures of `m.stats`, `vinehpc status` and
the metrics endpoint.

One `Tracker` is fed every journal record, in order: live, by the manager's I/O thread as it
writes them (so the figures are the log's, maintained incrementally: a record costs a few
dictionary operations, a snapshot never scans the tasks); after the run, by replaying
RUN_DIR/transactions.jsonl (`replay`), which is what `vinehpc status RUN_DIR` shows once the
manager is gone.  One reader of the log's vocabulary for both, so the live and the post-mortem
figures cannot drift apart.

Field names follow TaskVine's stats where it has one (workers_connected, tasks_waiting,
tasks_done -- every task handed back, failures included, so tasks_done + tasks_running +
tasks_waiting == tasks_submitted --, bytes_sent...).  A task runs from its `started` record
(tasks_running); from `dispatched` it is on a worker (tasks_on_workers: running, or sent ahead
and waiting there), so tasks_waiting (not started) counts those waiting on workers too.  The older short keys (submitted, waiting,
running, done = succeeded, failed, workers) stay for existing callers.
"""
from __future__ import annotations

import collections
import json
import os
import time

RATE_WINDOW = 60            # seconds of completions behind "throughput now"
MAX_KEYS = 100              # categories or tags tracked one by one; the rest are counted as "(other)"
RECENT_LOST = 20            # workers lost remembered with their reason
RES = ("cores", "memory", "disk", "gpus")     # a worker's list: [host, *RES, busy cores, tasks running]
COUNTED = ("tasks_submitted", "tasks_running", "tasks_on_workers", "tasks_done", "tasks_succeeded", "tasks_failed",
           "tasks_cancelled", "tasks_retried", "tasks_dispatched", "tasks_resumed", "workers_connected", "workers_busy",
           "workers_joined", "workers_lost", "workers_released", "total_cores", "total_memory", "total_disk",
           "total_gpus", "committed_cores", "bytes_sent", "files_sent", "connections_rejected",
           "tasks_ended_last_minute")
_NONE = object()            # "no such entry", where None is a value


class Stats(dict):
    """A dict of figures that also reads as attributes (TaskVine's `m.stats.tasks_done`)."""
    __slots__ = ()

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class _Group:
    """Task counts of one category or tag."""
    __slots__ = ("submitted", "running", "done", "failed", "retried")

    def __init__(self):
        self.submitted = self.running = self.done = self.failed = self.retried = 0

    def as_dict(self):
        return {"submitted": self.submitted, "waiting": self.submitted - self.done - self.failed - self.running,
                "running": self.running, "done": self.done, "failed": self.failed, "retried": self.retried}


class Tracker:
    """Figures of one manager's session, updated record by record (`feed`)."""

    def __init__(self):
        self._on = {
            "manager started": self._started, "submitted": self._submitted, "resumed": self._resumed,
            "dispatched": self._dispatched, "started": self._task_started, "done": self._ended, "failed": self._ended,
            "retry": self._retried, "retry larger": self._retried, "requeued": self._retried,
            "fast abort": self._retried, "not run": lambda r: self._back(r.get("task")), "worker joined": self._joined,
            "worker lost": self._lost, "put": self._put, "stopping": self._stopping,
            "manager stopped": self._stopped, "rejected": self._rejected,
            "draining": lambda r: setattr(self, "draining", True),
            "name": lambda r: setattr(self, "name", r.get("name")),
        }
        self.reset(None)
        self.sessions = 0
        self.version = 0            # records fed: the server republishes m.stats when it moved

    def reset(self, rec):
        self.started = self.last if rec else None
        self.address = rec.get("address") if rec else None
        self.name = rec.get("name") if rec else None
        self.last = self.started       # time of the last record
        self.stopped = None            # time of "manager stopped": the run has ended
        self.stopping = False          # workers that leave from now on were told to
        self.draining = False
        self.c = dict.fromkeys(COUNTED, 0)   # flat counts, TaskVine names
        self.tasks = {}                # tid -> its shape, while not handed back
        self._shapes = {}              # (category, tag, cores) -> (category, cores, its groups): one per kind
        self.on_workers = {}           # tid -> wid, dispatched and not ended
        self.running = collections.OrderedDict()   # tid -> start time, of those; first is the oldest
        self.workers = {}              # wid -> [host, cores, memory, disk, gpus, busy cores, tasks]
        self.categories = {}           # name -> _Group
        self.tags = {}
        self.lost = collections.deque(maxlen=RECENT_LOST)
        self.lost_why = collections.Counter()
        self.rate = collections.deque()   # [second, tasks ended in it], the last RATE_WINDOW seconds

    def feed(self, rec: dict, t: float | None = None) -> None:
        """One journal record; `t`: the time the journal gave it (a replay: the record's own).
        Three a task, on the manager's I/O thread: the handlers of a task's records are written
        for it (locals, no record read twice; issue 15)."""
        self.version += 1
        if t is None:
            t = rec.get("time")
            if t is None:
                t = time.time()
        self.last = t
        h = self._on.get(rec.get("event"))
        if h is not None:
            h(rec)

    # ---------------------------------------------------------------- records
    def _started(self, rec):
        sessions = self.sessions
        self.reset(rec)             # a resubmitted pilot appends a new session to the same log
        self.sessions = sessions + 1

    def _group(self, groups, key):
        g = groups.get(key)
        if g is None:
            g = groups.get("(other)") if len(groups) >= MAX_KEYS else None
            if g is None:
                g = groups[key if len(groups) < MAX_KEYS else "(other)"] = _Group()
        return g

    def _submitted(self, rec):
        tid = rec.get("task")
        cores = (rec.get("resources") or {}).get("cores") or 1
        key = (rec.get("category") or "default", rec.get("tag"), cores)
        shape = self._shapes.get(key)
        if shape is None:
            groups = (self._group(self.categories, key[0]),)
            if key[1] is not None:
                groups += (self._group(self.tags, str(key[1])),)
            shape = self._shapes[key] = (key[0], cores, groups)
        self.tasks[tid] = shape
        if tid is not None and tid >= 0:
            self.c["tasks_submitted"] += 1
            for g in shape[2]:
                g.submitted += 1

    def _resumed(self, rec):
        self.c["tasks_submitted"] += 1
        self.c["tasks_done"] += 1
        self.c["tasks_resumed"] += 1

    def _groups_of(self, tid):
        shape = self.tasks.get(tid)
        return shape[2] if shape is not None else ()

    def _dispatched(self, rec):
        tid, wid = rec.get("task"), rec.get("worker")
        c, on = self.c, self.on_workers
        c["tasks_dispatched"] += 1
        if tid in on:                    # cannot happen in a well-formed log; keep counts sane
            self._back(tid)
        on[tid] = wid
        w = self.workers.get(wid)
        if w is not None:
            self._busy(w, tid, 1)
        if tid is not None and tid >= 0:
            c["tasks_on_workers"] += 1

    def _task_started(self, rec):
        tid = rec.get("task")
        if tid not in self.on_workers or tid in self.running:
            return
        self.running[tid] = self.last
        if tid >= 0:
            self.c["tasks_running"] += 1
            for g in self._groups_of(tid):
                g.running += 1

    def _back(self, tid):
        """Task tid's attempt ended (the task ended, or not): it is no longer on its worker."""
        wid = self.on_workers.pop(tid, _NONE)
        if wid is _NONE:
            return
        w = self.workers.get(wid)
        if w is not None:
            self._busy(w, tid, -1)
        if tid >= 0:
            self.c["tasks_on_workers"] -= 1
            if self.running and self.running.pop(tid, None) is not None:
                self.c["tasks_running"] -= 1
                for g in self._groups_of(tid):
                    g.running -= 1

    def _busy(self, w, tid, sign):
        """A task starts (sign 1) or stops (-1) occupying worker `w`."""
        shape = self.tasks.get(tid)
        cores = sign * shape[1] if shape is not None else sign
        w[5] += cores
        c = self.c
        c["committed_cores"] += cores
        w[6] += sign
        if w[6] == (1 if sign > 0 else 0):
            c["workers_busy"] += sign

    def _retried(self, rec):
        tid = rec.get("task")
        self._back(tid)
        if tid is not None and tid >= 0:
            self.c["tasks_retried"] += 1
            for g in self._groups_of(tid):
                g.retried += 1

    def _ended(self, rec):
        tid = rec.get("task")
        self._back(tid)
        shape = self.tasks.pop(tid, None)
        if tid is None or tid < 0:
            return
        c = self.c
        c["tasks_done"] += 1
        if rec["event"] == "done":
            c["tasks_succeeded"] += 1
            if shape is not None:
                for g in shape[2]:
                    g.done += 1
        else:
            c["tasks_failed"] += 1
            if rec.get("result") == "cancelled":
                c["tasks_cancelled"] += 1
            if shape is not None:
                for g in shape[2]:
                    g.failed += 1
        sec = int(self.last)
        rate = self.rate
        if rate and rate[-1][0] == sec:
            rate[-1][1] += 1
        else:
            rate.append([sec, 1])
            self.tick(sec)
        c["tasks_ended_last_minute"] += 1

    def tick(self, now):
        """Forget completions older than the window (also called once a second: an idle minute
        brings "throughput now" down to 0)."""
        while self.rate and self.rate[0][0] <= now - RATE_WINDOW:
            self.c["tasks_ended_last_minute"] -= self.rate.popleft()[1]
            self.version += 1

    def _joined(self, rec):
        r = rec.get("resources") or {}
        w = self.workers[rec.get("worker")] = [rec.get("host") or "?"] + [r.get(k) or 0 for k in RES] + [0, 0]
        self._count_worker(w, 1)
        self.c["workers_joined"] += 1

    def _count_worker(self, w, sign):
        c = self.c
        c["workers_connected"] += sign
        for i, k in enumerate(RES, 1):
            c["total_" + k] += sign * w[i]
        if sign < 0:                 # its tasks are requeued after this record: they no longer occupy it
            c["committed_cores"] -= w[5]
            c["workers_busy"] -= 1 if w[6] else 0

    def _lost(self, rec):
        w = self.workers.pop(rec.get("worker"), None)
        if w is not None:
            self._count_worker(w, -1)
        if self.stopping:
            self.c["workers_released"] += 1     # told to leave: the run's end
            return
        self.c["workers_lost"] += 1
        why = str(rec.get("reason") or "?")[:200]
        self.lost_why[why] += 1
        self.lost.append({"worker": rec.get("worker"), "host": rec.get("host"), "reason": why,
                          "time": self.last, "tasks": len(rec.get("tasks") or ())})

    def _put(self, rec):
        self.c["bytes_sent"] += rec.get("size") or 0
        self.c["files_sent"] += 1

    def _rejected(self, rec):
        self.c["connections_rejected"] += 1

    def _stopping(self, rec):
        self.stopping = True

    def _stopped(self, rec):
        """The manager closed: its workers were released (the log records no loss for them) and
        what still ran will not end in this session (it counts as waiting: not run)."""
        self.stopped = self.last
        for tid in list(self.on_workers):
            self._back(tid)
        for w in self.workers.values():
            self._count_worker(w, -1)
        self.c["workers_released"] += len(self.workers)
        self.workers.clear()

    # ---------------------------------------------------------------- figures
    def published(self) -> dict:
        """The raw counts as they are now, for another thread's counts(): a copy, which the
        feeding thread makes between records so the figures agree with each other."""
        return dict(self.c)

    def counts(self, now: float, extra: dict | None = None, raw: dict | None = None) -> Stats:
        """The flat figures (m.stats, metrics): TaskVine's names, and the older short keys.
        `raw`: what published() gave (another thread reads it; nothing here is changed)."""
        c = self.c if raw is None else raw
        s = Stats(c)
        s["tasks_waiting"] = c["tasks_submitted"] - c["tasks_done"] - c["tasks_running"]
        s["workers_idle"] = s["workers_connected"] - s["workers_busy"]
        end = self.stopped or now
        span = (end - self.started) if self.started is not None else 0.0
        s["time_when_started"] = self.started
        s["elapsed"] = round(span, 3)
        s["tasks_per_second"] = round(c["tasks_ended_last_minute"] / min(RATE_WINDOW, max(span, 1.0)), 3)
        s["tasks_per_second_average"] = round(c["tasks_done"] / span, 3) if span > 0 else 0.0
        s["bytes_received"] = None
        if extra:
            s.update(extra)
        # the short keys vinehpc had before (done: succeeded only)
        s.update(submitted=s["tasks_submitted"], waiting=s["tasks_waiting"], running=s["tasks_running"],
                 done=s["tasks_succeeded"], failed=s["tasks_failed"], workers=s["workers_connected"], name=self.name)
        return s

    def snapshot(self, now: float, extra: dict | None = None) -> dict:
        """Everything `vinehpc status` shows: counts, per node, per category and tag, the oldest
        running task, workers lost.  O(workers + categories), never O(tasks)."""
        self.tick(int(self.stopped or now))
        nodes = {}
        for wid, w in self.workers.items():
            n = nodes.get(w[0])
            if n is None:
                n = nodes[w[0]] = {"host": w[0], "workers": 0, "busy": 0, "cores": 0, "busy_cores": 0,
                                   "memory": 0, "gpus": 0, "tasks": 0}
            n["workers"] += 1
            n["busy"] += 1 if w[6] else 0
            n["cores"] += w[1]
            n["busy_cores"] += w[5]
            n["memory"] += w[2]
            n["gpus"] += w[4]
            n["tasks"] += w[6]
        oldest = None
        for tid, t0 in self.running.items():
            wid = self.on_workers.get(tid)
            w = self.workers.get(wid)
            shape = self.tasks.get(tid)
            oldest = {"task": tid, "worker": wid, "host": w[0] if w else None,
                      "category": shape[0] if shape else None,
                      "running_for": round(now - t0, 3) if t0 is not None else None}
            break
        return {"counts": dict(self.counts(now, extra)), "address": self.address, "name": self.name,
                "sessions": self.sessions, "ended": self.stopped is not None, "ended_at": self.stopped,
                "last_record": self.last, "draining": self.draining, "now": now,
                "nodes": sorted(nodes.values(), key=lambda n: n["host"]),
                "categories": {k: g.as_dict() for k, g in sorted(self.categories.items())},
                "tags": {k: g.as_dict() for k, g in sorted(self.tags.items())},
                "oldest_running": oldest, "workers_lost": list(self.lost),
                "lost_reasons": dict(self.lost_why.most_common(10))}


def replay(path: str) -> Tracker:
    """A Tracker fed a whole transactions log (streamed; a torn last line is skipped)."""
    t = Tracker()
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if type(rec) is dict:
                t.feed(rec)
    return t


FINAL = "status.json"       # RUN_DIR/status.json: the last snapshot, written when the manager closes


def final_snapshot(tracker) -> dict:
    return tracker.snapshot(tracker.stopped or tracker.last or time.time())


def write_final(run_dir: str, tracker) -> None:
    """Keep the figures of a manager that closed, so `vinehpc status RUN_DIR` need not replay a
    log of millions of records (it does when the log is newer: another session, or a crash)."""
    path = os.path.join(run_dir, FINAL)
    fd = os.open(path + ".part", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)   # private, as the whole run dir
    with os.fdopen(fd, "w") as f:
        json.dump(final_snapshot(tracker), f, default=str)
    os.replace(path + ".part", path)


def from_log(run_dir: str, why: str) -> dict:
    """The snapshot the log of RUN_DIR gives (the manager is not answering: `why`)."""
    log, final = os.path.join(run_dir, "transactions.jsonl"), os.path.join(run_dir, FINAL)
    snap = None
    try:
        if os.path.getmtime(final) >= os.path.getmtime(log):
            with open(final) as f:
                snap = json.load(f)
    except (OSError, ValueError):
        snap = None
    if type(snap) is not dict:
        snap = final_snapshot(replay(log))
    snap.update(source="log", run_dir=run_dir, why=why)
    return snap
