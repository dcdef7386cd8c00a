"""Pilot start-up and throughput: `vinehpc pilot` in a real 2-node Slurm job vs `vinehpc run`.

    python benchmarks/pilot_startup.py [--repeat K] [--json]

Brings up the test bed's two-node Slurm on this host (tests/slurm/up.sh, root), submits
jobscripts/vine.sh on benchmarks/pilot_workload.py with 2 nodes (manager on n1, 2 one-core
workers on n2), and runs the same workload under `vinehpc run -n 2`. Reports the times from
the job's start to the manager ready, to all workers connected and to the first result, and
W1 throughput in both, with the ratio (target: the pilot not slower than 10%).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKLOAD = os.path.join(ROOT, "benchmarks", "pilot_workload.py")


def run_pilot(tmp, repeat):
    env = dict(os.environ, VINEHPC_WORKERS_PER_NODE="2", VINEHPC_CORES_PER_WORKER="1",
               VINEHPC_RUN_DIR=os.path.join(tmp, "pilot-run"))
    out = os.path.join(tmp, "job-%j.out")
    jid = subprocess.check_output(["sbatch", "--parsable", "-N", "2", "--ntasks-per-node=1", "--cpus-per-task=2",
                                   "-o", out, os.path.join(ROOT, "jobscripts", "vine.sh"), WORKLOAD, "2", "2000",
                                   str(repeat)], cwd=tmp, env=env, text=True).strip().split(";")[0]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        state = subprocess.run(["scontrol", "-o", "show", "job", jid], capture_output=True, text=True).stdout
        if "JobState=COMPLETED" in state or "JobState=FAILED" in state or "JobState=CANCELLED" in state:
            break
        time.sleep(0.2)
    else:
        subprocess.run(["scancel", jid])
        raise SystemExit("pilot job %s did not finish within 300 s" % jid)
    text = open(out.replace("%j", jid)).read()
    return _result(text, "pilot job %s" % jid)


def run_local(tmp, repeat):
    env = dict(os.environ, VINEHPC_JOB_T0="%.6f" % time.time(), VINEHPC_RUN_DIR=os.path.join(tmp, "local-run"))
    p = subprocess.run([sys.executable, "-m", "vinehpc", "run", "-n", "2", "--progress", "never", WORKLOAD, "2",
                        "2000", str(repeat)], cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    return _result(p.stdout + p.stderr, "vinehpc run")


def _result(text, what):
    for line in text.splitlines():
        if line.startswith("{") and "w1_tasks_per_s" in line:
            return json.loads(line)
    raise SystemExit("%s printed no result:\n%s" % (what, text))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="W1 repetitions (best of)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    subprocess.run(["bash", os.path.join(ROOT, "tests", "slurm", "up.sh")], check=True, stdout=subprocess.DEVNULL)
    with tempfile.TemporaryDirectory(prefix="vinehpc-bench-") as tmp:
        pilot = run_pilot(tmp, args.repeat)
        local = run_local(tmp, args.repeat)
    ratio = pilot["w1_tasks_per_s"] / local["w1_tasks_per_s"]
    if args.json:
        print(json.dumps({"pilot": pilot, "local": local, "w1_ratio": ratio}))
        return
    print("%-34s %12s %12s" % ("", "vinehpc pilot", "vinehpc run"))
    for k, label in (("manager_ready", "job start -> manager ready (s)"),
                     ("workers_connected", "job start -> workers connected (s)"),
                     ("first_result", "job start -> first result (s)")):
        print("%-34s %12.3f %12.3f" % (label, pilot[k], local[k]))
    print("%-34s %12.0f %12.0f" % ("W1 2,000 no-op tasks (tasks/s)", pilot["w1_tasks_per_s"], local["w1_tasks_per_s"]))
    print("pilot/run W1 ratio: %.2f  (target >= 0.90: %s)" % (ratio, "PASS" if ratio >= 0.9 else "MISS"))


if __name__ == "__main__":
    main()
