"""The pilot at scale on one machine: `mpiexec -n N+1 python -m vinehpc pilot` with N one-core workers.

    python benchmarks/pilot_scale.py [--ranks 8,32,64] [--tasks 500] [--json]

For each N: rank 0 runs the manager and benchmarks/pilot_workload.py, ranks 1..N one worker each
(all on this host: they meet on loopback, as ranks on one node do). Reports, from the launch of
mpiexec: the manager ready, every worker joined, the first result; the spread of the joins in
the run's journal (first to last "worker joined") and what one rank costs (that spread over N:
the ranks start at once, so the spread is the manager admitting them one after the other, plus
the machine starting N Python processes on its cores); the W1 rate of the workload with N
workers. Run by hand (not a test); on a 2-core machine 64 ranks are 65 Python processes plus 64
workers and their interpreters: the figures are dominated by starting processes on 2 cores.

Ends with one line a script can read:
    PILOT ranks=N joined_s=J first_result_s=F per_rank_ms=P w1_tasks_per_s=W
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
WORKLOAD = os.path.join(ROOT, "benchmarks", "pilot_workload.py")

from vinehpc import journal  # noqa: E402
from vinehpc.logs import journals  # noqa: E402


def one(n, tasks, tmp, timeout):
    mpiexec = shutil.which("mpiexec")
    if mpiexec is None:
        raise SystemExit("pilot_scale: no mpiexec on PATH (pip install mpi4py mpich)")
    run_dir = os.path.join(tmp, "run-%d" % n)
    t0 = time.time()
    env = dict(os.environ, VINEHPC_JOB_T0="%.6f" % t0, VINEHPC_CORES_PER_WORKER="1")
    p = subprocess.run([mpiexec, "-n", str(n + 1), sys.executable, "-m", "vinehpc", "pilot", "--run-dir", run_dir,
                        WORKLOAD, str(n), str(tasks), "1"], cwd=tmp, env=env, capture_output=True, text=True,
                       timeout=timeout)
    out = None
    for line in (p.stdout + p.stderr).splitlines():
        if line.startswith("{") and "w1_tasks_per_s" in line:
            out = json.loads(line)
    if out is None:
        raise SystemExit("pilot_scale: %d ranks printed no result (exit %s):\n%s\n%s"
                         % (n, p.returncode, p.stdout[-3000:], p.stderr[-3000:]))
    logs = journals(run_dir)
    if not logs:
        raise SystemExit("pilot_scale: no transactions log under %s" % run_dir)
    joins = sorted(r["time"] for r in journal.read(logs[0]) if r.get("event") == "worker joined")
    if len(joins) < n:
        raise SystemExit("pilot_scale: %d of %d workers joined" % (len(joins), n))
    spread = joins[-1] - joins[0]
    return {"ranks": n, "manager_ready_s": out["manager_ready"], "joined_s": out["workers_connected"],
            "first_result_s": out["first_result"], "join_spread_s": spread, "per_rank_ms": spread / n * 1e3,
            "first_join_s": joins[0] - t0, "w1_tasks_per_s": out["w1_tasks_per_s"],
            "total_s": time.time() - t0}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", default="8,32,64", help="comma-separated worker rank counts (default 8,32,64)")
    ap.add_argument("--tasks", type=int, default=500, help="no-op tasks of the W1 part (default 500)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per mpiexec (default 600)")
    ap.add_argument("--json", action="store_true", help="one JSON document on stdout")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="vinehpc-pilot-scale-") as tmp:
        for n in (int(x) for x in a.ranks.split(",")):
            print("[pilot_scale] %d worker ranks ..." % n, file=sys.stderr, flush=True)
            rows.append(one(n, a.tasks, tmp, a.timeout))
    if a.json:
        print(json.dumps({"rows": rows, "cpus": os.cpu_count()}))
    else:
        print("%6s %10s %10s %12s %12s %10s %10s" % ("ranks", "ready s", "joined s", "1st result s", "join spread",
                                                   "ms/rank", "W1 /s"))
        for r in rows:
            print("%6d %10.2f %10.2f %12.2f %12.2f %10.1f %10.0f" % (
                r["ranks"], r["manager_ready_s"], r["joined_s"], r["first_result_s"], r["join_spread_s"],
                r["per_rank_ms"], r["w1_tasks_per_s"]))
        print("(%d cpus; times from mpiexec's launch; ms/rank = first-to-last join over the ranks)" % os.cpu_count())
    last = rows[-1]
    print("PILOT ranks=%d joined_s=%.2f first_result_s=%.2f per_rank_ms=%.1f w1_tasks_per_s=%.0f" % (
        last["ranks"], last["joined_s"], last["first_result_s"], last["per_rank_ms"], last["w1_tasks_per_s"]),
        file=sys.stderr if a.json else sys.stdout)


if __name__ == "__main__":
    main()
