"""One pass over a run's transactions.jsonl into bounded aggregates (no record is kept).

A run of a million tasks writes a few million lines: everything here is a fixed number of time
bins, per-category log histograms and sums, a heap of the slowest 1 %, at most GANTT_MAX
attempts drawn one by one and per-worker busy time per bin for at most WORKER_ROWS workers.
The only per-task state is for attempts in flight (dispatched, no result yet).

Times: a record's `time` is the manager's clock when it was written.  An attempt's start is its
`started` record (under pipelining a task is dispatched before it starts).  An attempt without one
(its start came with its own result; an older vinehpc): its ending record's time
minus `wall` (the worker's own measure, from the task's start), never before its dispatch; an
attempt with no `wall` either (its worker was lost, it was cancelled) started at its dispatch.
"""
from __future__ import annotations

import heapq
import json
import os
import re

from .stats import MEM_DECADES, MEM_LO, WALL_DECADES, WALL_LO, Category, log_bin

NBINS = 300            # time bins over the run
GANTT_MAX = 2000       # attempts drawn one by one; a larger run is drawn binned per worker
WORKER_ROWS = 200      # workers with a timeline row (and per-bin busy time)
WORKERS_MAX = 10000    # worker records kept (joins, losses); beyond: counted only
CATEGORIES_MAX = 24    # categories told apart; the others are summed in OTHER
OTHER = "(other)"
RUNNING = "(still running at the end)"     # attempts the log does not end: drawn in gray
GROUPS_MAX = 200       # distinct failure reasons
FAILURES_MAX = 200     # final failures listed one by one
SLOW_MAX = 10000       # heap of the slowest tasks: the slowest 1 % of up to a million tasks

_EVENT = '"event":"'
_NUMBER = r"(-?[0-9][0-9.e+-]*)"
# the core's dispatched, started and successful done records, keys in the order state.py/placement.py write them
_DISPATCHED = re.compile(r'\{"task":(-?\d+),"worker":(\d+),"host":(?:"[^"\\]*"|null),"attempt":\d+,'
                         r'(?:"cached":(\d+),)?"event"')
_STARTED = re.compile(r'\{"task":(-?\d+),"worker":\d+,"attempt":\d+,"queued":(?:true|false),"event"')
_DONE = re.compile(r'\{"task":(-?\d+),"worker":(\d+),"result":"success","exit_code":(?:-?\d+|null),'
                   r'"reason":(?:null|"[^"\\]*"),"wall":' + _NUMBER + r',"attempts":(\d+),"category":"([^"\\]*)",'
                   r'"allocated":\{([^{}]*)\},"measured":\{"memory":' + _NUMBER + r',"cores":' + _NUMBER +
                   r',"wall":[^,]*,"disk":' + _NUMBER + r'[^{}]*\},"event"')
_KV = re.compile(r'"(\w+)":' + _NUMBER)


_ALLOCATED = {}          # the text of an allocation -> its dict: a run has few distinct ones


def _allocated(s) -> dict:
    """'"cores":1,"memory":2000' -> {"cores": 1.0, "memory": 2000.0}."""
    d = _ALLOCATED.get(s)
    if d is None:
        d = {k: float(v) for k, v in _KV.findall(s)}
        if len(_ALLOCATED) < 1000:
            _ALLOCATED[s] = d
    return d


class ReportError(Exception):
    """The run directory cannot be reported on (the message says how to fix it)."""


class Worker:
    __slots__ = ("key", "host", "cores", "joined", "lost", "reason", "tasks", "busy")

    def __init__(self, key, host, cores, joined):
        self.key, self.host, self.cores, self.joined = key, host, cores, joined
        self.lost = self.reason = None
        self.tasks = 0
        self.busy = None          # category -> [busy core-seconds per bin], for the first WORKER_ROWS workers


def _time_range(path):
    """(first, last) record time, from the file's two ends (the last line may be torn)."""
    first = last = None
    with open(path, "rb") as f:
        for line in f:
            first = _time_of(line)
            if first is not None:
                break
        size = f.seek(0, os.SEEK_END)
        back = 1 << 16
        while last is None:
            f.seek(max(0, size - back))
            lines = f.read().splitlines()
            if size > back:
                lines = lines[1:]          # the first may be the end of a line
            for line in reversed(lines):
                last = _time_of(line)
                if last is not None:
                    break
            if back >= size:
                break
            back *= 4
    return first, last


def _time_of(line):
    try:
        t = json.loads(line).get("time")
    except (ValueError, AttributeError):
        return None
    return float(t) if isinstance(t, (int, float)) else None


class Aggregate:
    """Feed it the lines of a journal (`feed`), then read its fields (plots.py, render.py)."""

    def __init__(self, t0, t1):
        self.t0 = t0
        self.width = max(t1 - t0, 1e-3) / NBINS
        z = [0.0] * NBINS
        self.submitted, self.started, self.requeued, self.done, self.failed = (list(z) for _ in range(5))
        self.busy_tasks, self.busy_cores, self.capacity, self.connected = (list(z) for _ in range(4))
        self.bytes_put, self.puts, self.hits, self.fetches = (list(z) for _ in range(4))
        self.joins, self.losses = [], []                 # times (at most WORKERS_MAX each)
        self.categories = {}
        self.workers = {}                                # (session, wid) -> Worker
        self.workers_seen = 0
        self.inflight = {}                               # (session, tid) -> [dispatch time, worker key, start time]
        self.gantt = []                                  # (worker key, start, end, category, outcome)
        self.gantt_total = 0
        self.groups = {}                                 # (kind, result, reason pattern) -> [n, example, tids, cats]
        self.failures = []                               # final failures, the first FAILURES_MAX
        self.slow = []                                   # min-heap of (wall, tid, category, worker)
        self.n = dict.fromkeys(("submitted", "done", "failed", "resumed", "attempts", "retries", "requeued",
                                "fast aborts", "not run", "multi-attempt", "records", "unreadable",
                                "sessions", "puts", "bytes put", "cache hits", "temp fetches",
                                "url fetches", "workers lost"), 0)
        self.first_submit = self.last_end = self.last_final = None
        self.connected_now = self.connected_peak = 0
        self.start = self.stop = None
        self.stop_reason = None
        self.session = 0
        self.wall_total = 0.0
        self.torn_last = False
        self.records = self.n_submitted = self.n_attempts = self.n_done = 0     # hot counters, into n at the end
        self.last_t = self.t_end = t0
        self.path = None

    # ------------------------------------------------------------------ bins
    def _bin(self, t) -> int:
        b = int((t - self.t0) / self.width)
        return 0 if b < 0 else (NBINS - 1 if b >= NBINS else b)

    def _spread(self, s, e, pairs):
        """For each (arr, weight): add weight x (overlap seconds of [s, e] with each bin) to arr."""
        if e <= s:
            return
        w, t0 = self.width, self.t0
        bs, be = self._bin(s), self._bin(e)
        if bs == be:                  # the common case: an attempt shorter than a bin
            d = e - s
            for arr, weight in pairs:
                arr[bs] += d * weight
            return
        head, tail = t0 + (bs + 1) * w - s, e - (t0 + be * w)
        for arr, weight in pairs:
            arr[bs] += head * weight
            for b in range(bs + 1, be):
                arr[b] += w * weight
            arr[be] += tail * weight

    def _cat(self, name) -> Category:
        c = self.categories.get(name)
        if c is None:
            if len(self.categories) >= CATEGORIES_MAX:
                name = OTHER
                c = self.categories.get(name)
            if c is None:
                c = self.categories[name] = Category(name)
        return c

    # ------------------------------------------------------------------ reading
    def feed(self, line: str) -> None:
        """One journal line.  The core's three records of every task (submitted, dispatched, done)
        are most of a log: they are read by position and regular expression (their keys come in
        the order the core writes them); anything else, or any surprise, goes through json."""
        self.records += 1
        i = line.rfind(_EVENT)
        j = line.find('"', i + 9)
        event = line[i + 9:j]
        if i >= 0 and line.startswith(',"time":', j + 1):
            try:
                t = float(line[j + 9:line.rindex("}")])
            except ValueError:
                t = None
            if t is not None:
                if event == "submitted":
                    self._submitted(t, not line.startswith('{"task":-'))
                    return
                if event == "started":
                    m = _STARTED.match(line)
                    if m is not None:
                        self._started(t, int(m.group(1)))
                        self.last_t = t
                        return
                m = _DISPATCHED.match(line) if event == "dispatched" else _DONE.match(line) if event == "done" \
                    else None
                if m is not None:
                    if event == "dispatched":
                        self._dispatched(t, int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))
                    else:
                        tid, wid, wall, attempts, cat, alloc, mem, cores, disk = m.groups()
                        self._final(t, int(tid), int(wid), True, float(wall), int(attempts), cat, _allocated(alloc),
                                    {"memory": float(mem), "cores": float(cores), "disk": float(disk)}, None)
                    self.last_t = t
                    return
        try:
            rec = json.loads(line)
            t = float(rec["time"])
        except (ValueError, KeyError, TypeError):
            self._unreadable(line)
            return
        h = self._handlers.get(rec.get("event"))
        if h is not None:
            h(self, rec, t)
        self.last_t = t

    def _unreadable(self, line):
        if line.strip():
            self.n["unreadable"] += 1
            self.torn_last = not line.endswith("\n")

    def _submitted(self, t, counted):
        b = int((t - self.t0) / self.width)
        self.submitted[0 if b < 0 else (NBINS - 1 if b >= NBINS else b)] += 1
        if counted:                   # not a hidden re-run (a negative id)
            self.n_submitted += 1
        if self.first_submit is None:
            self.first_submit = t
        self.last_t = t

    def _dispatched(self, t, tid, wid, cached):
        wkey = (self.session, wid)
        self.inflight[(self.session, tid)] = [t, wkey, None]
        self.n_attempts += 1
        if cached:
            self.n["cache hits"] += cached
            self.hits[self._bin(t)] += cached

    def _started(self, t, tid):
        got = self.inflight.get((self.session, tid))
        if got is not None:
            got[2] = t

    def _attempt_end(self, t, tid, wall, outcome, category, cores):
        """An attempt ended at t (result, loss, kill): draw it and free the in-flight slot.
        Returns its start, or None when nothing was running (a task failed while waiting)."""
        got = self.inflight.pop((self.session, tid), None)
        if got is None:
            return None
        dispatched, wkey, start = got
        if start is None:          # no `started` record: an older log
            start = t - wall if wall is not None and t - wall > dispatched else dispatched
        self.started[self._bin(start)] += 1
        cores = cores if isinstance(cores, (int, float)) and cores > 0 else 1
        w = self.workers.get(wkey)
        if w is not None:
            w.tasks += 1
        if w is not None and w.busy is not None:
            arr = w.busy.get(category)
            if arr is None:
                arr = w.busy[category] = [0.0] * NBINS
            self._spread(start, t, ((self.busy_tasks, 1.0), (self.busy_cores, cores), (arr, cores)))
        else:
            self._spread(start, t, ((self.busy_tasks, 1.0), (self.busy_cores, cores)))
        self.gantt_total += 1
        if len(self.gantt) < GANTT_MAX:
            self.gantt.append((wkey, start, t, category, outcome))
        return start

    def _group(self, kind, rec, category):
        reason = str(rec.get("reason") or "")
        key = (kind, str(rec.get("result") or ""), re.sub(r"\d+", "N", reason)[:160])
        g = self.groups.get(key)
        if g is None:
            if len(self.groups) >= GROUPS_MAX:
                key = (kind, "", "(other reasons)")
                g = self.groups.get(key)
            if g is None:
                g = self.groups[key] = [0, reason[:300], [], set()]
        g[0] += 1
        if len(g[2]) < 5 and rec.get("task") is not None:
            g[2].append(rec.get("task"))
        if len(g[3]) < 5 and category is not None:
            g[3].add(category)

    # ------------------------------------------------------------------ events
    def _final_rec(self, rec, t):
        wall = rec.get("wall")
        self._final(t, rec.get("task"), rec.get("worker"), rec.get("event") == "done",
                    float(wall) if isinstance(wall, (int, float)) else None, rec.get("attempts") or 0,
                    rec.get("category") or "default", rec.get("allocated") or {}, rec.get("measured") or {}, rec)

    def _final(self, t, tid, wid, ok, wall, attempts, category, alloc, measured, rec):
        """A task's last record (done or failed); rec: the whole record when it was parsed (failures)."""
        cat = self._cat(category)
        cores = alloc.get("cores") or 1
        started = self._attempt_end(t, tid, wall, "done" if ok else "failed", cat.name, cores)
        if not isinstance(tid, int) or tid < 0:
            return                       # a hidden re-run of a lost temp's producer: drawn, not counted
        if self.last_final is None or t > self.last_final:
            self.last_final = t
        b = self._bin(t)
        if started is None:
            self.started[b] += 1          # failed while waiting: leaves the queue now
        if ok:
            self.done[b] += 1
            self.n_done += 1
            cat.done += 1
        else:
            self.failed[b] += 1
            self.n["failed"] += 1
            cat.failed += 1
            self._group("failed", rec, cat.name)
            if len(self.failures) < FAILURES_MAX:
                self.failures.append({k: rec.get(k) for k in ("task", "category", "result", "reason", "attempts",
                                                               "worker", "exit_code")})
        cat.attempts += attempts
        if attempts > 1:
            self.n["multi-attempt"] += 1
        if wall is None:
            return
        self.wall_total += wall
        cat.wall_sum += wall
        if wall > cat.wall_max:
            cat.wall_max = wall
        cat.wall_hist[log_bin(wall, WALL_LO, WALL_DECADES)] += 1
        cat.core_s_alloc += cores * wall
        used = measured.get("cores")
        if used is not None:
            cat.core_s_used += used * wall
        mem = measured.get("memory")
        amem = alloc.get("memory")
        if mem is not None:
            cat.mem_used_n += 1
            cat.mem_used_sum += mem
            if mem > cat.mem_used_max:
                cat.mem_used_max = mem
            cat.mem_hist[log_bin(mem, MEM_LO, MEM_DECADES)] += 1
            if amem:
                cat.mem_waste_mb_s += max(0.0, amem - mem) * wall
        if amem:
            cat.mem_alloc_n += 1
            cat.mem_alloc_sum += amem
        if alloc.get("disk") and measured.get("disk") is not None:
            cat.disk_n += 1
            cat.disk_alloc_sum += alloc["disk"]
            cat.disk_used_sum += measured["disk"]
        slow = self.slow
        if len(slow) < SLOW_MAX:
            heapq.heappush(slow, (wall, tid, cat.name, wid))
        elif wall > slow[0][0]:
            heapq.heapreplace(slow, (wall, tid, cat.name, wid))

    def _again(self, rec, t, kind, counter):
        """An attempt ended and the task goes back to the queue."""
        category = self._cat(rec.get("category") or "default").name
        wall = rec.get("wall")
        start = self._attempt_end(t, rec.get("task"), wall if isinstance(wall, (int, float)) else None, kind,
                                  category, rec.get("cores"))
        if start is not None:
            self.requeued[self._bin(t)] += 1
        self.n[counter] += 1
        self._group(kind, rec, category)

    def _end_session(self, t):
        """This manager's log ends at t (it stopped, or was killed): what still ran ran until then, on
        workers still connected."""
        for _, tid in list(self.inflight):
            self._attempt_end(t, tid, None, "running", RUNNING, 1)
        for w in self.workers.values():
            if w.lost is None and w.key[0] == self.session:
                self._worker_gone(w, t, None)

    def _manager_started(self, rec, t):
        if self.session:
            self._end_session(self.last_t)     # an earlier manager, killed before it stopped
        self.n["sessions"] += 1
        self.session += 1
        if self.start is None:
            self.start = t

    def _manager_stopped(self, rec, t):
        self.stop, self.stop_reason = t, rec.get("reason")
        self._end_session(t)

    def _worker_gone(self, w, t, reason):
        w.lost, w.reason = t, reason
        self.connected_now -= 1
        self._spread(w.joined, t, ((self.capacity, w.cores), (self.connected, 1.0)))

    def _worker_joined(self, rec, t):
        self.workers_seen += 1
        if len(self.joins) < WORKERS_MAX:
            self.joins.append(t)
        if len(self.workers) >= WORKERS_MAX:
            return
        self.connected_now += 1
        self.connected_peak = max(self.connected_peak, self.connected_now)
        key = (self.session, rec.get("worker"))
        w = self.workers[key] = Worker(key, rec.get("host"), (rec.get("resources") or {}).get("cores") or 1, t)
        if len(self.workers) <= WORKER_ROWS:
            w.busy = {}

    def _worker_lost(self, rec, t):
        self.n["workers lost"] += 1
        if len(self.losses) < WORKERS_MAX:
            self.losses.append(t)
        w = self.workers.get((self.session, rec.get("worker")))
        if w is not None and w.lost is None:
            self._worker_gone(w, t, rec.get("reason") or "lost")
        self._group("worker lost", rec, None)

    def _put(self, rec, t):
        size = rec.get("size") or 0
        b = self._bin(t)
        self.puts[b] += 1
        self.bytes_put[b] += size
        self.n["puts"] += 1
        self.n["bytes put"] += size

    def _fetch(self, rec, t):
        self.fetches[self._bin(t)] += 1
        self.n["temp fetches" if rec.get("event") == "fetch temp" else "url fetches"] += 1

    def _resumed(self, rec, t):
        self.n["resumed"] += 1

    _handlers = {
        "submitted": lambda self, r, t: self._submitted(t, r.get("task", 0) >= 0),
        "dispatched": lambda self, r, t: self._dispatched(t, r.get("task"), r.get("worker"), r.get("cached") or 0),
        "started": lambda self, r, t: self._started(t, r.get("task")),
        "done": _final_rec, "failed": _final_rec,
        "retry": lambda self, r, t: self._again(r, t, "retry", "retries"),
        "retry larger": lambda self, r, t: self._again(r, t, "retry larger", "retries"),
        "requeued": lambda self, r, t: self._again(r, t, "requeued", "requeued"),
        "fast abort": lambda self, r, t: self._again(r, t, "fast abort", "fast aborts"),
        "not run": lambda self, r, t: self._again(r, t, "not run", "not run"),
        "manager started": _manager_started, "manager stopped": _manager_stopped,
        "worker joined": _worker_joined, "worker lost": _worker_lost,
        "put": _put, "fetch temp": _fetch, "fetch url": _fetch, "resumed": _resumed,
    }

    def finish(self, t_end):
        """The log ended at t_end: what was still running (a killed run) ran until then, on workers
        still connected."""
        self._end_session(t_end)
        self.t_end = t_end
        self.n.update(records=self.records, submitted=self.n_submitted, attempts=self.n_attempts, done=self.n_done)


def load(run_dir: str) -> Aggregate:
    """Read RUN_DIR/transactions.jsonl once; raise ReportError saying what to do when it cannot be."""
    path = os.path.join(run_dir, "transactions.jsonl") if os.path.isdir(run_dir) else run_dir
    if not os.path.exists(run_dir):
        raise ReportError("%s does not exist: give a run directory (vine-run-info/<run>) or its "
                          "transactions.jsonl" % run_dir)
    if not os.path.isfile(path):
        runs = sorted((e.path for e in os.scandir(run_dir) if os.path.isfile(os.path.join(e.path, "transactions.jsonl"))),
                      key=os.path.getmtime) if os.path.isdir(run_dir) else []
        if runs:
            raise ReportError("%s holds %d run directories, not a run's journal: the newest is %s"
                              % (run_dir, len(runs), runs[-1]))
        raise ReportError("%s has no transactions.jsonl: give a run directory (they are made under "
                          "./vine-run-info/ where the script ran, or a pilot's --run-dir)" % run_dir)
    try:
        t0, t1 = _time_range(path)
    except OSError as e:
        raise ReportError("cannot read %s: %s" % (path, e)) from None
    if t0 is None:
        raise ReportError("%s holds no journal record (empty, or not a vinehpc transactions log): "
                          "report on a run directory whose run has started" % path)
    agg = Aggregate(t0, t1)
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            agg.feed(line)
    agg.finish(t1)
    if agg.n["unreadable"] > agg.n["records"] // 2:
        raise ReportError("%s is mostly not JSON lines (%d of %d unreadable): not a vinehpc transactions log"
                          % (path, agg.n["unreadable"], agg.n["records"]))
    agg.path = path
    return agg
