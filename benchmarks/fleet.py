"""One manager, thousands of simulated workers (issue 15): what grows with the fleet and the queue.

    python benchmarks/fleet.py                          # N = 10, 100, 1000, 5000; 100,000 no-op tasks each
    python benchmarks/fleet.py --workers 10,1000 --tasks 20000
    python benchmarks/fleet.py --queue --queue-tasks 1000000 --workers 1000
    python benchmarks/fleet.py --json

A real `vinehpc.Manager` runs in this process (its I/O thread is the manager: its CPU is
`Manager.manager_cpu_seconds`, its memory this process's RSS); the workers are simulated
(benchmarks/fleet_sim.py: child processes, one socket per worker, the real handshake and framing).
Per N, in one invocation (ratios within it: the 2-core machine is shared and noisy):

- join_s: all N connect at once (one "connect" to the fleet processes) until the manager counts N
  (the slowest of its joins);
- idle_cpu_pct: the manager's CPU over --idle seconds with N joined workers and nothing to do
  (keepalives only: the interval is --keepalive, 5 s by default as in vinehpc), at N's first join;
- tasks_per_s: --tasks no-op command tasks, submitted then waited for, first submit to last wait,
  the fastest of the runs of that N.  The runs are paired so that the shared machine's changing
  speed falls on both ends of a ratio: the 10-worker fleet
  joins once and stays; for each other N, --repeat times (6): one run on the 10-worker fleet, then
  a fresh fleet of N joins, runs once and closes (one fleet alive at a time besides the 10: no
  other fleet's objects for the collector to walk, no other fleet's keepalives).  ratio_to_10 is
  the fastest run of N over the fastest of the 10-worker runs paired with N's (--json:
  paired_10_tasks_per_s); each pair's own ratio is in pair_ratios (and printed), every run's
  tasks/s in runs_tasks_per_s; the figures below are the fastest run's.  One run here is up to
  20 % off the next, seconds apart: --repeat 10 for a tighter ratio;
- mgr_ms_per_task: the manager thread's CPU over that run / tasks;
- process_cpu_pct: this whole process's CPU over that run (manager thread + the user's submit and
  wait: near 100 means the GIL, not the manager thread, bounds it); submit_s: the submit loop;
- rss_mb: this process's RSS after it; wait_ms p50/p99: from the simulated worker sending a result
  (its stdout carries CLOCK_MONOTONIC) to wait() returning it, for results sent after the last submit.

--profile FILE: cProfile the manager's I/O thread over the task runs (pstats file, FILE.N per N);
--phases: its thread CPU per task split by what a loop turn does (reading messages -- results and
the core's handling of them --, the inbox -- submits --, the scheduling pass, socket writes, the
journal flush, the hand-over, the rest of the loop).  Both are opt-in measuring instruments: they
wrap the Server's methods from here, nothing in vinehpc/ knows of them.

--queue: --queue-tasks tasks (half command tasks, half PythonTasks with a small argument) submitted
with no worker connected: submit rate of each kind, RSS per queued task beyond the Task objects the
user holds, then the time to drain them through the first --workers value of simulated workers.

Ends with one line per N, the largest last:
FLEET workers=N tasks=M tasks_per_s=X ratio_to_10=Y mgr_ms_per_task=Z join_s=J idle_cpu_pct=I
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import psutil  # noqa: E402

import vinehpc  # noqa: E402
from fleet_sim import Fleet, raise_nofile  # noqa: E402


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2 ** 20


def _pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def noop(x):
    return x


PHASES = {"_readable": "read", "_op": "inbox", "_flush": "sockets", "_hand_over": "hand_over",
          "publish_stats": "publish", "_accept": "accept", "_timers": "timers"}


class Instruments:
    """--profile / --phases: wrap the manager's I/O thread from outside (see the module doc)."""

    def __init__(self, a):
        from vinehpc import server as srv
        self.prof = None
        self.phases = None
        self.on = False
        orig_run = srv.Server._run
        me = self
        if a.profile:
            import cProfile

            def run(self_):
                me.prof = cProfile.Profile()
                orig_run(self_)
            srv.Server._run = run
        if a.phases:
            import collections
            self.phases = collections.Counter()
            clock = time.thread_time
            stack = []      # [phase, start, time of the phases nested in it]

            def timed(fn, name, nested=False):
                """A phase: the outermost one counts, but for `nested` ones (the journal's encoding,
                done where a record is written once PENDING wait), counted apart from their caller."""
                def wrapper(*args, **kw):
                    if not me.on or stack and (not nested or stack[-1][0] == name):
                        return fn(*args, **kw)
                    entry = [name, clock(), 0.0]
                    stack.append(entry)
                    try:
                        return fn(*args, **kw)
                    finally:
                        stack.pop()
                        dt = clock() - entry[1]
                        me.phases[name] += dt - entry[2]
                        if stack:
                            stack[-1][2] += dt
                return wrapper
            for meth, name in PHASES.items():
                setattr(srv.Server, meth, timed(getattr(srv.Server, meth), name))
            feed = srv.Server._feed

            def feed_timed(self_, event, now):     # the scheduling pass: _feed(SCHEDULE) from the loop
                if event is srv.SCHEDULE:
                    return sched(self_, event, now)
                return feed(self_, event, now)
            sched = timed(feed, "schedule")
            srv.Server._feed = feed_timed
            from vinehpc import journal
            journal.Journal.flush = timed(journal.Journal.flush, "journal")
            if hasattr(journal.Journal, "_encode"):     # (a checkout without it encodes in flush alone)
                journal.Journal._encode = timed(journal.Journal._encode, "journal", nested=True)

    def _gc(self, phase, info):
        """gc.callbacks: the collector's time (any thread), by generation."""
        if phase == "start":
            self._gc_t0 = time.perf_counter()
        elif self.on:
            self.gc_s[info["generation"]] += time.perf_counter() - self._gc_t0
            self.gc_n[info["generation"]] += 1

    def start(self, m):
        self.on = True
        if self.phases is not None:
            import gc
            self.gc_s, self.gc_n = [0.0] * 3, [0] * 3
            if self._gc not in gc.callbacks:
                gc.callbacks.append(self._gc)
            self.phases.clear()
            self.cpu0 = m.manager_cpu_seconds
        if self.prof is not None:
            m._call(self.prof.enable)

    def stop(self, m, n, tasks, a):
        self.on = False
        out = {}
        if self.prof is not None:
            m._call(self.prof.disable)
            path = "%s.%d" % (a.profile, n)
            self.prof.dump_stats(path)
            out["profile"] = path
        if self.phases is not None:
            total = m.manager_cpu_seconds - self.cpu0
            ph = {k: round(1e6 * v / tasks, 1) for k, v in sorted(self.phases.items(), key=lambda kv: -kv[1])}
            ph["loop_rest"] = round(1e6 * (total - sum(self.phases.values())) / tasks, 1)
            out["phases_us_per_task"] = ph
            out["gc_us_per_task"] = [round(1e6 * x / tasks, 1) for x in self.gc_s]
            out["gc_collections"] = self.gc_n
        return out


def open_fleet(tmp, n, a, **kw):
    """A manager and a fleet of n simulated workers connecting at once; returns (m, fleet, join_s)."""
    m = vinehpc.Manager(port=0, host="127.0.0.1", run_dir=os.path.join(tmp, "run-%d-%d" % (n, time.monotonic_ns())),
                        keepalive_interval=a.keepalive)
    fleet = Fleet(("127.0.0.1", m.port), m.secret_file, n, procs=a.procs or (1 if n < 1000 else 2),
                  cores=a.cores, run=a.run, result_size=a.result_size, **kw)
    t0 = time.monotonic()
    fleet.connect()
    joined = m.wait_for_workers(n, timeout=a.join_timeout)
    join_s = time.monotonic() - t0
    if joined < n:
        print("only %d of %d workers joined within %.0f s" % (joined, n, a.join_timeout), file=sys.stderr)
    return m, fleet, join_s


def run_tasks(m, tasks, timeout):
    """Submit `tasks` no-op tasks, wait for all; (seconds, cpu seconds, wait latencies)."""
    cpu0 = m.manager_cpu_seconds
    proc0 = psutil.Process().cpu_times()
    t0 = time.monotonic()
    for _ in range(tasks):
        m.submit(vinehpc.Task(":"))
    submitted = time.monotonic()
    lat, got = [], 0
    while got < tasks:
        t = m.wait(timeout)
        if t is None:
            raise RuntimeError("no result for %.0f s (%d of %d back)" % (timeout, got, tasks))
        got += 1
        now = time.monotonic()
        sent = float(t.std_output[:20]) if t.std_output else None
        if sent is not None and sent >= submitted:
            lat.append(now - sent)
        if not t.successful():
            raise RuntimeError("task %s: %s %s" % (t.id, t.result, t.reason))
    dt = time.monotonic() - t0
    proc = psutil.Process().cpu_times()
    busy = (proc.user + proc.system - proc0.user - proc0.system) / dt
    return dt, m.manager_cpu_seconds - cpu0, lat, {"submit_s": round(submitted - t0, 3), "process_cpu_pct": round(100 * busy, 1)}


class Sized:
    """One N's manager and fleet, joined: its join and idle figures, then its runs (run())."""

    def __init__(self, n, a, tmp, idle=True):
        self.a = a
        self.m, self.fleet, join_s = open_fleet(tmp, n, a, disconnect=a.disconnect, slow=a.slow)
        m = self.m
        self.r = r = {"workers": n, "joined": m.wait_for_workers(n, timeout=0), "join_s": round(join_s, 3)}
        r["join_retries"] = self.fleet.report().get("retries", 0)
        if idle:
            cpu0 = m.manager_cpu_seconds
            time.sleep(a.idle)
            r["idle_cpu_pct"] = round(100 * (m.manager_cpu_seconds - cpu0) / a.idle, 2)
        self.best, self.runs = None, []

    def run(self) -> float:
        """One run of --tasks tasks; its tasks/s."""
        # each run starts with the collector's generations empty: what came before it (a closed
        # fleet's objects) is not this run's to walk
        gc.collect()
        sim0 = self.fleet.cpu_seconds()
        run = run_tasks(self.m, self.a.tasks, self.a.timeout)
        rate = round(self.a.tasks / run[0], 1)
        self.runs.append(rate)
        if self.best is None or run[0] < self.best[0][0]:
            self.best = (run, self.fleet.cpu_seconds() - sim0)
        return rate

    def close(self) -> dict:
        """Close the manager and the fleet; this fleet's figures (its fastest run's)."""
        a, r = self.a, self.r
        try:
            if self.best is None:       # (no run finished: a failure on its way up)
                return r
            (dt, cpu, lat, more), sim = self.best
            r.update(more)
            r["runs_tasks_per_s"] = list(self.runs)
            r.update(tasks=a.tasks, seconds=round(dt, 3), tasks_per_s=round(a.tasks / dt, 1),
                     mgr_ms_per_task=round(1000 * cpu / a.tasks, 4), sim_ms_per_task=round(1000 * sim / a.tasks, 4),
                     sim_cpu_pct=round(100 * sim / dt, 1), load=round(os.getloadavg()[0], 2),
                     rss_mb=round(rss_mb(), 1), wait_ms_p50=round(1000 * (_pct(lat, 0.5) or 0), 2),
                     wait_ms_p99=round(1000 * (_pct(lat, 0.99) or 0), 2))
            r["fleet"] = {k: v for k, v in self.fleet.report().items() if k in ("tasks", "results", "retries",
                                                                                  "closed", "connected", "cpu_s")}
        finally:
            self.m.close()
            self.fleet.close()
        return r


def measure(n, a, tmp) -> dict:
    """N's --repeat runs on one fleet (the instruments' way: one profile of N's runs)."""
    s = Sized(n, a, tmp)
    try:
        if a.instruments is not None:
            a.instruments.start(s.m)
        for _ in range(a.repeat):
            s.run()
        if a.instruments is not None:
            s.r.update(a.instruments.stop(s.m, n, a.tasks * a.repeat, a))
    except BaseException:
        s.close()
        raise
    return s.close()


def paired(ns, a, tmp) -> list:
    """The 10-worker fleet stays; each other N's runs alternate with runs on it (module doc)."""
    base = Sized(10, a, tmp)
    rows = []
    try:
        others = [n for n in ns if n != 10]
        if not others:
            for _ in range(a.repeat):
                base.run()
        for n in others:
            pairs, tens, opened = [], [], []
            for k in range(a.repeat):
                # a fresh fleet of n per run, the order of the pair alternating: 10 first, then n first
                ten = base.run() if k % 2 == 0 else None
                s = Sized(n, a, tmp, idle=k == 0)
                try:
                    rate = s.run()
                finally:
                    r = s.close()
                if ten is None:
                    ten = base.run()
                opened.append(r)
                tens.append(ten)
                pairs.append(round(rate / ten, 3))
                say(n, r, "pair %d (10 workers: %.0f tasks/s, ratio %.3f)" % (k + 1, ten, rate / ten))
            row = dict(max(opened, key=lambda x: x["tasks_per_s"]), joined=min(x["joined"] for x in opened),
                       join_s=max(x["join_s"] for x in opened), join_retries=max(x["join_retries"] for x in opened), idle_cpu_pct=opened[0]["idle_cpu_pct"],
                       runs_tasks_per_s=[x["tasks_per_s"] for x in opened], pair_ratios=pairs,
                       paired_10_tasks_per_s=tens)
            rows.append(row)
    except BaseException:
        base.close()
        raise
    ten_row = base.close()
    say(10, ten_row, "")
    return [ten_row] + rows


def say(n, r, what):
    print("N=%d %s join %.2fs%s %.0f tasks/s %.4f ms/task (process %.0f%%, simulator %.0f%% of a core, %.4f ms/task) "
          "rss %.0f MB wait p50 %.2f p99 %.2f ms load %.1f" % (
              n, what, r["join_s"], " idle %.2f%%" % r["idle_cpu_pct"] if "idle_cpu_pct" in r else "",
              r["tasks_per_s"], r["mgr_ms_per_task"], r["process_cpu_pct"], r["sim_cpu_pct"], r["sim_ms_per_task"],
              r["rss_mb"], r["wait_ms_p50"], r["wait_ms_p99"], r["load"]), file=sys.stderr, flush=True)
    if "phases_us_per_task" in r:
        print("N=%d phases (us/task): %s; gc (us/task, by generation, any thread) %s, collections %s"
              % (n, " ".join("%s=%s" % kv for kv in r["phases_us_per_task"].items()), r["gc_us_per_task"],
                 r["gc_collections"]), file=sys.stderr, flush=True)


def queue(a, tmp) -> dict:
    """A million queued tasks: submit rate, manager memory per queued task, drain time."""
    n = a.queue_tasks
    half = n // 2
    m = vinehpc.Manager(port=0, host="127.0.0.1", run_dir=os.path.join(tmp, "queue"), keepalive_interval=a.keepalive)
    try:
        base = rss_mb()
        cmd = [vinehpc.Task("echo %d" % i) for i in range(half)]
        py = [vinehpc.PythonTask(noop, i) for i in range(n - half)]
        held = rss_mb()
        t0 = time.monotonic()
        for t in cmd:
            m.submit(t)
        t1 = time.monotonic()
        for t in py:
            m.submit(t)
        t2 = time.monotonic()
        deadline = time.monotonic() + a.timeout
        while m.stats.submitted < n and time.monotonic() < deadline:     # the core has them all
            time.sleep(0.2)
        while True:                # one more loop turn: the turn that took them has flushed its journal
            try:
                m.manager_cpu_seconds
                break
            except TimeoutError:
                pass
        gc.collect()
        queued = rss_mb()
        r = {"queued": n, "submit_cmd_per_s": round(half / (t1 - t0), 1),
             "submit_py_per_s": round((n - half) / (t2 - t1), 1),
             "user_tasks_mb": round(held - base, 1), "manager_mb": round(queued - held, 1),
             "manager_bytes_per_task": round((queued - held) * 2 ** 20 / n, 1)}
        del cmd, py
        w = a.workers[0] if a.workers[0] != 10 or len(a.workers) == 1 else a.workers[-1]
        fleet = Fleet(("127.0.0.1", m.port), m.secret_file, w, procs=a.procs or 2, cores=a.cores, run=a.run)
        try:
            cpu0 = m.manager_cpu_seconds
            t0 = time.monotonic()
            fleet.connect()
            for _ in range(n):
                t = m.wait(a.timeout)
                if t is None or not t.successful():
                    raise RuntimeError("drain: %r" % (t and (t.id, t.result, t.reason)))
            dt = time.monotonic() - t0
            r.update(drain_workers=w, drain_s=round(dt, 1), drain_tasks_per_s=round(n / dt, 1),
                     drain_mgr_ms_per_task=round(1000 * (m.manager_cpu_seconds - cpu0) / n, 4))
        finally:
            m.close()
            fleet.close()
    finally:
        m.close()
    return r


def main(argv=None):
    ap = argparse.ArgumentParser(description="Simulated fleet against one real manager (issue 15).")
    ap.add_argument("--workers", default="10,100,1000,5000", help="comma-separated N (10 is added for ratio_to_10)")
    ap.add_argument("--tasks", type=int, default=100000)
    ap.add_argument("--repeat", type=int, default=6,
                    help="runs per N, each paired with a run on the 10-worker fleet; the fastest is reported")
    ap.add_argument("--cores", type=int, default=1, help="cores per simulated worker")
    ap.add_argument("--run", default="0", help="a task's modelled time: 0, SECONDS, exp:MEAN, uniform:LOW:HIGH")
    ap.add_argument("--result-size", type=int, default=0, help="bytes of stdout per result")
    ap.add_argument("--disconnect", type=int, default=0, help="workers that send half their first result, then close")
    ap.add_argument("--slow", type=int, default=0, help="workers that read 4 KiB a second")
    ap.add_argument("--procs", type=int, default=0, help="fleet processes (default 1 below 1,000 workers, else 2)")
    ap.add_argument("--idle", type=float, default=10.0, help="seconds of idle fleet measured")
    ap.add_argument("--keepalive", type=float, default=5.0, help="the manager's keepalive interval")
    ap.add_argument("--join-timeout", type=float, default=60.0)
    ap.add_argument("--timeout", type=float, default=120.0, help="longest wait for one result")
    ap.add_argument("--queue", action="store_true", help="the queue measurement instead")
    ap.add_argument("--queue-tasks", type=int, default=1000000)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--profile", metavar="FILE", help="cProfile the manager's I/O thread over the task runs")
    ap.add_argument("--phases", action="store_true", help="the I/O thread's CPU per task by phase of a loop turn")
    ap.add_argument("--keep", action="store_true", help="keep the run directories")
    a = ap.parse_args(argv)
    a.workers = [int(x) for x in a.workers.split(",")]
    a.instruments = Instruments(a) if a.profile or a.phases else None
    a.repeat = max(1, a.repeat)
    raise_nofile(2 * max(a.workers) + 4096)     # the manager's sockets (and, in tests, the fleet's)
    tmp = tempfile.mkdtemp(prefix="vinehpc-fleet-")
    try:
        if a.queue:
            r = queue(a, tmp)
            print(json.dumps(r) if a.json else "\n".join("%s: %s" % kv for kv in r.items()))
            return 0
        ns = a.workers if 10 in a.workers else [10] + a.workers
        if a.instruments is not None:       # one profile per N: its runs back to back on one fleet
            rows = []
            for n in ns:
                rows.append(measure(n, a, tmp))
                say(n, rows[-1], "")
        else:
            rows = paired(ns, a, tmp)
        base = next(r["tasks_per_s"] for r in rows if r["workers"] == 10)
        for r in rows:      # against the 10-worker runs paired with N's (all of them: the instruments' way)
            r["ratio_to_10"] = round(r["tasks_per_s"] / max(r.get("paired_10_tasks_per_s") or [base]), 3)
        if any("pair_ratios" in r for r in rows):
            print("ratio to 10 in each pair: %s" % "; ".join(
                "N=%d %s" % (r["workers"], " ".join("%.3f" % x for x in r["pair_ratios"]))
                for r in rows if "pair_ratios" in r), file=sys.stderr, flush=True)
        if a.json:
            print(json.dumps(rows, indent=1))
        for r in sorted(rows, key=lambda r: r["workers"]):
            if r["workers"] in a.workers:
                print("FLEET workers=%(workers)d tasks=%(tasks)d tasks_per_s=%(tasks_per_s).1f ratio_to_10=%(ratio_to_10).3f "
                      "mgr_ms_per_task=%(mgr_ms_per_task).4f join_s=%(join_s).2f idle_cpu_pct=%(idle_cpu_pct).2f" % r,
                      file=sys.stderr if a.json else sys.stdout)     # --json: stdout is one JSON document
        return 0
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
