"""Dispatch stall: does the user's own work between waits idle the workers?

    python benchmarks/dispatch_stall.py [--tasks 100] [--slots 5] [-t 0.1] [-p 0.02]

N tasks that each take t seconds run on `slots` single-core local workers, while the user
spends p seconds on every result before asking for the next (post-processing, sleeping here
so that it does not compete for this machine's 2 cores). Because the manager's I/O thread
dispatches on its own, the makespan should be max(N*t/slots, N*p), not N*t/slots + N*p.
Target: within 10% of that bound.
"""
import argparse
import json
import time

from vinehpc import Manager, PythonTask


def work(t):
    time.sleep(t)
    return t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=100)
    ap.add_argument("--slots", type=int, default=5)
    ap.add_argument("-t", type=float, default=0.1, help="seconds per task")
    ap.add_argument("-p", type=float, default=0.02, help="seconds of user post-processing per result")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    m = Manager(local_workers=a.slots)
    m.wait_for_workers(a.slots, timeout=60)
    for _ in range(2 * a.slots):     # warm-up: every worker has its Python interpreter and the function
        m.submit(PythonTask(work, 0.05))
    while not m.empty():
        m.wait(60)
    start = time.perf_counter()
    for _ in range(a.tasks):
        m.submit(PythonTask(work, a.t))
    while not m.empty():
        t = m.wait(60)
        assert t is not None and t.successful(), t and t.reason
        time.sleep(a.p)              # the user's post-processing of this result
    makespan = time.perf_counter() - start
    m.close()
    bound = max(a.tasks * a.t / a.slots, a.tasks * a.p)
    serial = a.tasks * a.t / a.slots + a.tasks * a.p
    res = {"makespan": makespan, "bound": bound, "if_dispatch_stalled": serial, "ratio": makespan / bound}
    if a.json:
        print(json.dumps(res))
    else:
        print("N=%d t=%.3f s slots=%d p=%.3f s: makespan %.2f s; bound max(N*t/slots, N*p) = %.2f s "
              "(stalled dispatch would take %.2f s); ratio %.3f (target <= 1.10: %s)"
              % (a.tasks, a.t, a.slots, a.p, makespan, bound, serial, res["ratio"],
                 "PASS" if res["ratio"] <= 1.10 else "MISS"))


if __name__ == "__main__":
    main()
