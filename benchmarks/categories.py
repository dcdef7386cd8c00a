"""Waste and makespan of category modes on a heterogeneous workload (issue: resources).

    python benchmarks/categories.py [--tasks 200] [--modes fixed,max,greedy-bucketing,...]

Two kinds of task, each its own category (tasks group well by kind): 70% use ~2 GB, 30% ~12 GB, on workers of
16 GB -- scaled down by 50 to fit this machine: 40 +- 8 MB and 240 +- 30 MB (a bytearray, touched
so it is resident) on 2 workers of 320 MB and 4 cores, each task holding its memory 0.1 s.
For each mode: waste (allocated - used memory, x seconds, from stats_category), makespan, the
share of tasks retried after a memory exhaustion. `fixed` uses the user's guess (--guess MB).
Target: bucketing wastes at least 50% less than `max` with no more than 5% of tasks retried.
"""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

from vinehpc import Manager, PythonTask

WORKER_MB, CORES = 320, 4


def use_memory(mb, seconds):
    import time as _t
    b = bytearray(int(mb * (1 << 20)))
    for i in range(0, len(b), 4096):          # make every page resident
        b[i] = 1
    _t.sleep(seconds)
    return len(b)


def run(mode, sizes, guess, hold, one_category=False):
    tmp = tempfile.mkdtemp(prefix="vinehpc-cat-")
    m = Manager(port=0, host="127.0.0.1", run_dir=os.path.join(tmp, "run"))
    env = dict(os.environ, VINEHPC_SECRET=m.secret)
    workers = [subprocess.Popen([sys.executable, "-m", "vinehpc", "worker", "127.0.0.1:%d" % m.port,
                                 "--cores", str(CORES), "--memory", str(WORKER_MB), "--no-reconnect"], env=env)
               for _ in range(2)]
    try:
        m.wait_for_workers(2, timeout=60)
        cats = ("all",) if one_category else ("small", "large")
        for cat in cats:
            m.set_category_mode(cat, mode)
            if mode != "fixed":
                m.set_category_max_resources(cat, {"memory": WORKER_MB})
        start = time.perf_counter()
        for kind, mb in sizes:
            t = PythonTask(use_memory, mb, hold).set_category("all" if one_category else kind)
            if mode == "fixed":
                t.set_memory(guess)           # the user's one guess for every task
            m.submit(t)
        failed = 0
        while not m.empty():
            t = m.wait(120)
            if t is None:
                raise SystemExit("%s: tasks stopped coming back" % mode)
            failed += not t.successful()
        makespan = time.perf_counter() - start
        stats = [m.stats_category(c) for c in cats]
        s = {"waste x seconds": {"memory": sum(x["waste x seconds"]["memory"] for x in stats)},
             "allocated x seconds": {"memory": sum(x["allocated x seconds"]["memory"] for x in stats)},
             "tasks retried": sum(x["tasks retried"] for x in stats),
             "exhaustions": sum(x["exhaustions"] for x in stats),
             "buckets": {"memory": sum((x["buckets"].get("memory") or [] for x in stats), [])}}
    finally:
        m.close()
        for w in workers:
            w.wait(30)
    return {"mode": mode, "makespan": makespan, "waste_mb_s": s["waste x seconds"]["memory"],
            "allocated_mb_s": s["allocated x seconds"]["memory"], "retried": s["tasks retried"] / len(sizes),
            "exhaustions": s["exhaustions"], "failed": failed, "buckets": s["buckets"].get("memory")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=200)
    ap.add_argument("--modes", default="fixed,max,min-waste,greedy-bucketing,exhaustive-bucketing")
    ap.add_argument("--guess", type=int, default=300, help="the user's guess for `fixed` (MB)")
    ap.add_argument("--hold", type=float, default=0.1, help="seconds each task holds its memory")
    ap.add_argument("--one-category", action="store_true",
                    help="both kinds in ONE category (the user does not label them): the mixed distribution "
                         "bucketing is made for; default: one category per kind")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    r = random.Random(7)
    sizes = [("small", max(5.0, r.gauss(40, 8))) if r.random() < 0.7 else
             ("large", min(WORKER_MB - 40, max(100.0, r.gauss(240, 30)))) for _ in range(a.tasks)]
    results = [run(mode, sizes, a.guess, a.hold, a.one_category) for mode in a.modes.split(",")]
    if a.json:
        print(json.dumps(results, indent=2))
        return
    base = next((x for x in results if x["mode"] == "max"), None)
    print("%d tasks, %s" % (a.tasks, "one category for both kinds" if a.one_category else "one category per kind"))
    print("%-22s %12s %10s %9s %8s %s" % ("mode", "waste MB*s", "vs max", "makespan", "retried", "buckets (MB)"))
    for x in results:
        rel = "%.0f%%" % (100 * x["waste_mb_s"] / base["waste_mb_s"]) if base and base["waste_mb_s"] else "-"
        print("%-22s %12.0f %10s %8.1fs %7.1f%% %s" % (x["mode"], x["waste_mb_s"], rel, x["makespan"],
                                                     100 * x["retried"], [round(b) for b in (x["buckets"] or [])]))
    print("target: a bucketing mode wastes <= 50% of `max` with <= 5% of tasks retried")


if __name__ == "__main__":
    main()
