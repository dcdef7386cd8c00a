"""The workload benchmarks/pilot_startup.py runs, under `vinehpc pilot` or `vinehpc run`.

Prints one JSON line: seconds from the job's start (VINEHPC_JOB_T0, set by jobscripts/vine.sh;
else this process's start) to the manager being ready, to all workers connected and to the
first result, then W1 (2,000 no-op PythonTasks, submit all then wait all) in tasks/s.
"""
import json
import os
import sys
import time

T0 = float(os.environ.get("VINEHPC_JOB_T0") or time.time())


def noop(x):
    return x


def main():
    workers = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    repeat = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    from vinehpc import Manager, PythonTask
    m = Manager(resume=False)
    t_ready = time.time()
    m.wait_for_workers(workers, timeout=120)
    t_workers = time.time()
    m.submit(PythonTask(noop, 0))
    assert m.wait(60).output == 0
    t_first = time.time()
    for i in range(50):                      # warm-up: every interpreter has the function
        m.submit(PythonTask(noop, i))
    while not m.empty():
        m.wait(60)
    best = 0.0
    for _ in range(repeat):
        start = time.perf_counter()
        for i in range(n):
            m.submit(PythonTask(noop, i))
        total = 0
        while not m.empty():
            t = m.wait(60)
            total += t.output
        assert total == n * (n - 1) // 2
        best = max(best, n / (time.perf_counter() - start))
    m.close()
    print(json.dumps({"manager_ready": t_ready - T0, "workers_connected": t_workers - T0,
                      "first_result": t_first - T0, "w1_tasks_per_s": best, "workers": workers}))


if __name__ == "__main__":
    main()
