#!/usr/bin/env python3
"""CPU per task on each side: the workers, their Python interpreters, the manager's I/O thread
and the manager's whole process, for N no-op PythonTasks (or, with --calls, FunctionCalls to a "direct" library) through
standalone worker processes, and the wake-ups per task (voluntary context switches) of each.

    python benchmarks/per_task_cpu.py [--workers 2] [--tasks 3000] [--calls]

Run by hand (not a test). To compare two checkouts, alternate runs of each with PYTHONPATH set
to the checkout (the workers inherit it):

    PYTHONPATH=/path/to/old python /path/to/old/benchmarks/per_task_cpu.py
    PYTHONPATH=$PWD python benchmarks/per_task_cpu.py

Absolute figures are noise on a shared 2-core machine; compare runs made one after the other.
"""
import argparse
import os
import sys
import tempfile
import time

import psutil

from vinehpc import FunctionCall, Manager, PythonTask

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import standalone  # noqa: E402


def noop(i):
    return i


def _cpu(procs):
    return sum(sum(p.cpu_times()[:2]) for p in procs)


def _switches(procs):
    """Voluntary context switches (the process slept: one wake-up each), all threads."""
    return sum(p.num_ctx_switches().voluntary for p in procs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tasks", type=int, default=3000)
    ap.add_argument("--calls", action="store_true", help="FunctionCalls to a library (exec_mode direct)")
    a = ap.parse_args()
    run_dir = tempfile.mkdtemp(prefix="vinehpc-cpu-")
    m = Manager(port=0, host="127.0.0.1", run_dir=run_dir)
    with standalone.workers(m, a.workers) as ws:
        if a.calls:
            m.install_library(m.create_library_from_functions("bench", noop, exec_mode="direct"))

        def make(i):
            return FunctionCall("bench", "noop", i) if a.calls else PythonTask(noop, i)
        for i in range(20):                       # warm-up: interpreters started, function sent
            m.submit(make(i))
        for _ in range(20):
            m.wait(30)
        workers = [psutil.Process(w.pid) for w in ws]
        kids = [k for w in workers for k in w.children(recursive=True)]
        me = psutil.Process()
        w0, k0, io0, p0 = _cpu(workers), _cpu(kids), m.manager_cpu_seconds, time.process_time()
        s0 = (_switches(workers), _switches(kids), _switches([me]))
        t0 = time.perf_counter()
        for i in range(a.tasks):
            m.submit(make(i))
        n = 0
        deadline = time.monotonic() + 600
        while n < a.tasks and time.monotonic() < deadline:
            if m.wait(10) is not None:
                n += 1
        dt = time.perf_counter() - t0
        us = 1e6 / a.tasks
        sw = [(b - x) / a.tasks for b, x in zip((_switches(workers), _switches(kids), _switches([me])), s0)]
        print("%d %s, %d workers: %.0f tasks/s; CPU per task: workers %.0f us, interpreters %.0f us, "
              "manager I/O thread %.0f us, manager process %.0f us; wake-ups per task: workers %.2f, "
              "interpreters %.2f, manager %.2f"
              % (n, "calls" if a.calls else "tasks", a.workers, n / dt, (_cpu(workers) - w0) * us,
                 (_cpu(kids) - k0) * us, (m.manager_cpu_seconds - io0) * us, (time.process_time() - p0) * us,
                 *sw))


if __name__ == "__main__":
    main()
