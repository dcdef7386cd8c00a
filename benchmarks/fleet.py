"""One manager, thousands of simulated workers (issue 15): what grows with the fleet and the queue.

    python benchmarks/fleet.py                          # N = 10, 100, 1000, 5000; 100,000 no-op tasks each
    python benchmarks/fleet.py --workers 10,1000 --tasks 20000
    python benchmarks/fleet.py --queue --queue-tasks 1000000 --workers 1000
    python benchmarks/fleet.py --json

A real `vinehpc.Manager` runs in this process (its I/O thread is the manager: its CPU is
`Manager.manager_cpu_seconds`, its memory this process's RSS); the workers are simulated
(benchmarks/fleet_sim.py: child processes, one socket per worker, the real handshake and framing).
Per N, in one invocation (ratios within it: the 2-core machine is shared and noisy):

- join_s: all N connect at once (the slowest of the rounds) (one "connect" to the fleet processes) until the manager counts N;
- idle_cpu_pct: the manager's CPU over --idle seconds (first round only) with N joined workers and nothing to do
  (keepalives only: the interval is --keepalive, 5 s by default as in vinehpc);
- tasks_per_s: --tasks no-op command tasks, submitted then waited for, first submit to last wait,
  the fastest of all the runs of that N: --repeat runs (3) on the same fleet, in each of --rounds
  sweeps (2). A round opens a fresh fleet per N, and every other round goes through the N in the
  opposite order (10, 100, ..., 5000, then 5000, ..., 100, 10), so a slow spell of the shared machine
  falls on both ends of a ratio rather than on one N (every run's figure is in --json's
  runs_tasks_per_s, and ratio_to_10 of each round in round_ratios; the figures below are the
  fastest run's);
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


def measure(n, a, tmp, idle=True) -> dict:
    m, fleet, join_s = open_fleet(tmp, n, a, disconnect=a.disconnect, slow=a.slow)
    try:
        r = {"workers": n, "joined": m.wait_for_workers(n, timeout=0), "join_s": round(join_s, 3)}
        rep = fleet.report()
        r["join_retries"] = rep.get("retries", 0)
        if idle:
            cpu0 = m.manager_cpu_seconds
            time.sleep(a.idle)
            r["idle_cpu_pct"] = round(100 * (m.manager_cpu_seconds - cpu0) / a.idle, 2)
        if a.instruments is not None:
            a.instruments.start(m)
        best, runs = None, []
        for _ in range(a.repeat):       # the same fleet each time: the fastest run is the one reported
            sim0 = fleet.cpu_seconds()
            run = run_tasks(m, a.tasks, a.timeout)
            runs.append(round(a.tasks / run[0], 1))
            if best is None or run[0] < best[0][0]:
                best = (run, fleet.cpu_seconds() - sim0)
        (dt, cpu, lat, more), sim = best
        if a.instruments is not None:
            r.update(a.instruments.stop(m, n, a.tasks * a.repeat, a))
        r.update(more)
        r["runs_tasks_per_s"] = runs
        r.update(tasks=a.tasks, seconds=round(dt, 3), tasks_per_s=round(a.tasks / dt, 1),
                 mgr_ms_per_task=round(1000 * cpu / a.tasks, 4), sim_ms_per_task=round(1000 * sim / a.tasks, 4),
                 sim_cpu_pct=round(100 * sim / dt, 1), load=round(os.getloadavg()[0], 2), rss_mb=round(rss_mb(), 1),
                 wait_ms_p50=round(1000 * (_pct(lat, 0.5) or 0), 2), wait_ms_p99=round(1000 * (_pct(lat, 0.99) or 0), 2))
        r["fleet"] = {k: v for k, v in fleet.report().items() if k in ("tasks", "results", "retries", "closed",
                                                                         "connected", "cpu_s")}
    finally:
        m.close()
        fleet.close()
    return r


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
    ap.add_argument("--repeat", type=int, default=3, help="task runs per N on the same fleet; the fastest is reported")
    ap.add_argument("--rounds", type=int, default=2,
                    help="sweeps over the N, each with fresh fleets, every other one in reverse order")
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
    if a.instruments is not None:
        a.rounds = 1            # one profile per N
    a.rounds = max(1, a.rounds)
    raise_nofile(2 * max(a.workers) + 4096)     # the manager's sockets (and, in tests, the fleet's)
    tmp = tempfile.mkdtemp(prefix="vinehpc-fleet-")
    try:
        if a.queue:
            r = queue(a, tmp)
            print(json.dumps(r) if a.json else "\n".join("%s: %s" % kv for kv in r.items()))
            return 0
        ns = a.workers if 10 in a.workers else [10] + a.workers
        runs = {n: [] for n in ns}         # per N, its measurement in each round
        for k in range(a.rounds):
            for n in (ns if k % 2 == 0 else ns[::-1]):
                r = measure(n, a, tmp, idle=k == 0)
                runs[n].append(r)
                print("round %d N=%d join %.2fs%s %.0f tasks/s %.4f ms/task (process %.0f%%, simulator %.0f%% of a core, "
                      "%.4f ms/task) rss %.0f MB wait p50 %.2f p99 %.2f ms load %.1f"
                      % (k + 1, n, r["join_s"], " idle %.2f%%" % r["idle_cpu_pct"] if k == 0 else "", r["tasks_per_s"],
                         r["mgr_ms_per_task"], r["process_cpu_pct"], r["sim_cpu_pct"], r["sim_ms_per_task"], r["rss_mb"],
                         r["wait_ms_p50"], r["wait_ms_p99"], r["load"]), file=sys.stderr, flush=True)
                if "phases_us_per_task" in r:
                    print("N=%d phases (us/task): %s; gc (us/task, by generation, any thread) %s, collections %s"
                          % (n, " ".join("%s=%s" % kv for kv in r["phases_us_per_task"].items()), r["gc_us_per_task"],
                             r["gc_collections"]), file=sys.stderr, flush=True)
        rows = []
        for n in ns:            # the fastest round's figures, with the worst join and every run's tasks/s
            rs = runs[n]
            r = dict(max(rs, key=lambda x: x["tasks_per_s"]), joined=min(x["joined"] for x in rs),
                     join_s=max(x["join_s"] for x in rs), join_retries=max(x["join_retries"] for x in rs),
                     idle_cpu_pct=rs[0]["idle_cpu_pct"], runs_tasks_per_s=[v for x in rs for v in x["runs_tasks_per_s"]])
            r["round_ratios"] = [round(x["tasks_per_s"] / y["tasks_per_s"], 3) for x, y in zip(rs, runs[10])]
            rows.append(r)
        base = max(x["tasks_per_s"] for x in runs[10])
        for r in rows:
            r["ratio_to_10"] = round(r["tasks_per_s"] / base, 3)
        if a.rounds > 1:
            print("ratio to 10 in each round: %s" % "; ".join(
                "N=%d %s" % (r["workers"], " ".join("%.3f" % x for x in r["round_ratios"]))
                for r in rows if r["workers"] != 10), file=sys.stderr, flush=True)
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
