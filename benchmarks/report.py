"""`vinehpc report` on a synthetic journal of a million tasks: seconds and peak memory.

    python benchmarks/report.py                      # 1,000,000 tasks, 250 workers x 4 cores
    python benchmarks/report.py --tasks 100000 --keep DIR

The journal is written the way the core writes it (same records, same key order): every task
submitted at the start, dispatched when a core frees up (a heap of free slots), done with
allocated and measured resources; three categories; 0.5 % of tasks fail once and are retried,
0.05 % fail for good; two workers are lost mid-run (their tasks requeued); inputs are put once
per worker and category, cache hits after that.  Records come out in time order.  Then
`python -m vinehpc report RUN_DIR -o report.html` runs in a child process, timed, with its
peak RSS (getrusage of the children), and the same for `--json`.
"""
from __future__ import annotations

import argparse
import heapq
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# name, share of tasks, cores, memory MB asked, median wall s, measured memory MB
CATEGORIES = (("simulate", 0.70, 1, 2000, 20.0, 900.0), ("analyze", 0.25, 1, 4000, 5.0, 2500.0),
              ("io", 0.05, 1, 1000, 60.0, 300.0))


def synthesize(run_dir, n_tasks, workers=250, cores=4, seed=1):
    """Write run_dir/transactions.jsonl for n_tasks tasks; returns what the report must find."""
    rng = random.Random(seed)
    os.makedirs(run_dir, exist_ok=True)
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    t = 1.7e9
    out = open(os.path.join(run_dir, "transactions.jsonl"), "w", buffering=1 << 20)
    w = out.write
    w(dumps({"event": "manager started", "address": "n1:9123", "pid": 1, "python": "3.11.7", "resumable": None,
             "time": t}) + "\n")
    for i in range(1, workers + 1):
        w(dumps({"worker": i, "host": "node%03d" % ((i - 1) // 4), "resources": {"cores": cores, "memory": 64000,
                 "disk": 100000, "gpus": 0}, "pid": 1000 + i, "cached": 0, "event": "worker joined",
                 "time": t + i * 0.001}) + "\n")
    cat_of = []
    for tid in range(1, n_tasks + 1):
        r = rng.random()
        c = 0 if r < 0.70 else 1 if r < 0.95 else 2
        cat_of.append(c)
        name, _, cc, mem, _, _ = CATEGORIES[c]
        w('{"task":%d,"kind":"Task","category":"%s","tag":null,"resources":{"cores":%d,"memory":%d,"disk":0,'
          '"gpus":0},"event":"submitted","time":%.6f}\n' % (tid, name, cc, mem, t + 1 + tid * 2e-6))
    t += 1 + n_tasks * 2e-6
    # free cores: a heap of (time, worker); every task takes one core
    ends = []                                  # heap of (time, seq, line, tid, worker)
    alive = set(range(1, workers + 1))
    have = set()                               # (worker, category) with the input already there
    lost_at = {t + 3600: 17, t + 7200: 42}     # two workers lost, an hour apart
    queue = list(range(n_tasks, 0, -1))        # pop() gives task 1 first
    tries = {}
    seq = 0
    done = failed = 0
    slots = [(t, i) for i in alive for _ in range(cores)]
    heapq.heapify(slots)
    while queue or ends:
        now = slots[0][0] if slots and queue else float("inf")
        while ends and ends[0][0] <= now:
            et, _, line, tid, wk = heapq.heappop(ends)
            if wk not in alive:
                continue
            if min(lost_at, default=float("inf")) <= et:
                lt = min(lost_at)
                wid = lost_at.pop(lt)
                alive.discard(wid)
                victims = [e for e in ends if e[4] == wid] + ([(et, 0, line, tid, wk)] if wk == wid else [])
                w(dumps({"worker": wid, "host": "node%03d" % ((wid - 1) // 4), "reason": "keepalive timeout",
                         "tasks": sorted(v[3] for v in victims), "event": "worker lost", "time": lt}) + "\n")
                for v in victims:
                    c = CATEGORIES[cat_of[v[3] - 1]]
                    w(dumps({"task": v[3], "reason": "worker %d lost: keepalive timeout" % wid, "category": c[0],
                             "cores": c[2], "event": "requeued", "time": lt}) + "\n")
                    queue.append(v[3])
                if wk == wid:
                    continue
            w(line)
            if '"event":"retry"' in line:
                queue.append(tid)
            elif '"event":"done"' in line:
                done += 1
            elif '"event":"failed"' in line:
                failed += 1
        if not queue:
            continue
        st, wid = heapq.heappop(slots)
        if wid not in alive:
            continue
        tid = queue.pop()
        name, _, cc, mem, med, mmem = CATEGORIES[cat_of[tid - 1]]
        hit = (wid, name) in have
        if not hit:
            have.add((wid, name))
            w(dumps({"worker": wid, "file": "file-%s" % name, "size": 50_000_000, "task": tid, "event": "put",
                     "time": st}) + "\n")
        tries[tid] = tries.get(tid, 0) + 1
        w('{"task":%d,"worker":%d,"host":"node%03d","attempt":%d,%s"event":"dispatched","time":%.6f}\n'
          % (tid, wid, (wid - 1) // 4, tries[tid], '"cached":1,' if hit else "", st))
        w('{"task":%d,"worker":%d,"attempt":%d,"queued":false,"event":"started","time":%.6f}\n'
          % (tid, wid, tries[tid], st))
        wall = med * rng.lognormvariate(0, 0.5)
        et = st + wall
        r = rng.random()
        measured = '{"memory":%.1f,"cores":%.3f,"wall":%.6f,"disk":0.0,"read":0,"written":0,"procs":1}' % (
            mmem * rng.uniform(0.6, 1.2), cc * rng.uniform(0.5, 1.0), wall)
        if r < 0.005 and tries[tid] == 1:
            line = dumps({"task": tid, "worker": wid, "result": "failed", "reason": "exit code 1", "attempt": 1,
                          "of": 1, "wall": wall, "category": name, "cores": cc, "event": "retry",
                          "time": et}) + "\n"
        else:
            ok = not 0.005 <= r < 0.0055
            line = ('{"task":%d,"worker":%d,"result":"%s","exit_code":%d,"reason":%s,"wall":%.6f,"attempts":%d,'
                    '"category":"%s","allocated":{"cores":%d,"memory":%d},"measured":%s,"event":"%s","time":%.6f}\n'
                    % (tid, wid, "success" if ok else "failed", 0 if ok else 3,
                       "null" if ok else '"exit code 3"', wall, tries[tid], name, cc, mem, measured,
                       "done" if ok else "failed", et))
        seq += 1
        heapq.heappush(ends, (et, seq, line, tid, wid))
        heapq.heappush(slots, (et, wid))
    t_end = max(s[0] for s in slots) + 1
    w(dumps({"event": "manager stopped", "reason": "done", "io_cpu_seconds": 1.0, "time": t_end}) + "\n")
    out.close()
    return {"tasks": n_tasks, "done": done, "failed": failed}


def _timed(cmd):
    """Run cmd; (seconds, its own peak RSS in MB, its CPU seconds, its stdout)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT)
        _, status, ru = os.wait4(p.pid, 0)       # this child's rusage, not the maximum over all children
        secs = time.perf_counter() - t
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if p.returncode:
            sys.exit("failed: %s\n%s" % (" ".join(cmd), err.read()))
        return secs, ru.ru_maxrss / 1024, ru.ru_utime + ru.ru_stime, out.read()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=1_000_000)
    ap.add_argument("--keep", metavar="DIR", help="write the run directory here and keep it")
    ap.add_argument("--write-only", metavar="DIR", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.write_only:
        print(json.dumps(synthesize(a.write_only, a.tasks)))
        return 0
    run_dir = a.keep or tempfile.mkdtemp(prefix="vine-report-bench-")
    try:
        t = time.perf_counter()
        # in a child: this process stays small, so the report's children do not inherit its pages (the
        # peak RSS of a forked child counts what it held before exec)
        truth = json.loads(subprocess.run([sys.executable, __file__, "--tasks", str(a.tasks), "--write-only", run_dir],
                                          check=True, capture_output=True, text=True).stdout)
        size = os.path.getsize(os.path.join(run_dir, "transactions.jsonl"))
        print("journal: %d tasks, %.0f MB, written in %.1f s" % (a.tasks, size / 1e6, time.perf_counter() - t))
        html = os.path.join(run_dir, "report.html")
        secs, rss, cpu, _ = _timed([sys.executable, "-m", "vinehpc", "report", run_dir, "-o", html])
        print("vinehpc report -o report.html: %.1f s (cpu %.1f s), peak RSS %.0f MB, page %.1f MB"
              % (secs, cpu, rss, os.path.getsize(html) / 1e6))
        secs, rss, cpu, out = _timed([sys.executable, "-m", "vinehpc", "report", run_dir, "--json"])
        s = json.loads(out)
        print("vinehpc report --json: %.1f s (cpu %.1f s), peak RSS %.0f MB" % (secs, cpu, rss))
        got = (s["tasks"]["done"], s["tasks"]["failed"])
        print("done/failed: report %s, journal %s" % (got, (truth["done"], truth["failed"])))
        if got != (truth["done"], truth["failed"]):
            return 1
    finally:
        if not a.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
