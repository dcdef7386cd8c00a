#!/usr/bin/env python3
"""A pilot test workload: PythonTasks and command tasks with input and output files.

    vinehpc pilot tests/pilot_scripts/workload.py OUTDIR [--n N] [--cmd K] [--pyfiles P]
                  [--sleep S] [--wait-workers W] [--raise-when-running R] [--input-version V]

Inputs are written to OUTDIR/in (deterministic contents, so a resubmitted job computes the
same task keys), outputs go to OUTDIR/out. Every result is checked here, exactly once;
the outcome is printed as one "WORKLOAD OK ..." / "WORKLOAD FAILED ..." line and written
to OUTDIR/summary.json (the tests check the output files themselves, independently).
"""
import argparse
import json
import os
import sys
import time
from collections import Counter

from vinehpc import Manager, PythonTask, Task


def work(i, sleep):
    """The PythonTask: i*i + 7, after `sleep` seconds."""
    time.sleep(sleep)
    return i * i + 7


def reverse_file(src, dst):
    """A PythonTask with files: runs in its sandbox, reads `src`, writes `dst`."""
    with open(src) as f:
        lines = f.readlines()
    with open(dst, "w") as f:
        f.writelines(reversed(lines))
    return len(lines)


def input_text(j, version=0):
    """Input file j: j + 3 + version lines."""
    return "".join("line %d of file %d abc\n" % (k, j) for k in range(j + 3 + version))


def main(argv):
    ap = argparse.ArgumentParser()
    ap.add_argument("outdir")
    ap.add_argument("--n", type=int, default=20, help="PythonTasks work(i)")
    ap.add_argument("--cmd", type=int, default=0, help="command tasks with input and output files")
    ap.add_argument("--pyfiles", type=int, default=0, help="PythonTasks with an input and an output file")
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--wait-workers", type=int, default=0)
    ap.add_argument("--raise-when-running", type=int, default=0, metavar="R",
                    help="raise an exception once R tasks run (instead of waiting for them)")
    ap.add_argument("--input-version", type=int, default=0, help="adds lines to every input file")
    a = ap.parse_args(argv[1:])

    indir, outdir = os.path.join(a.outdir, "in"), os.path.join(a.outdir, "out")
    os.makedirs(indir, exist_ok=True)
    os.makedirs(outdir, exist_ok=True)
    for j in range(max(a.cmd, a.pyfiles)):
        with open(os.path.join(indir, "in_%d.txt" % j), "w") as f:
            f.write(input_text(j, a.input_version))

    m = Manager()
    if a.wait_workers:
        m.wait_for_workers(a.wait_workers, timeout=90)
    expect, kind = {}, {}
    cmd_every = max(1, a.n // a.cmd) if a.cmd else 0
    cmd_next = 0

    def submit_cmd(j):
        t = Task("sleep %s; wc -l < in.txt > count.txt; tr a-z A-Z < in.txt > upper.txt; cat salt.txt >> upper.txt"
                 % a.sleep)
        t.add_input(m.declare_file(os.path.join(indir, "in_%d.txt" % j), cache=True), "in.txt")
        t.add_input(m.declare_buffer("salt %d\n" % j), "salt.txt")
        t.add_output(m.declare_file(os.path.join(outdir, "count_%d.txt" % j)), "count.txt")
        t.add_output(m.declare_file(os.path.join(outdir, "upper_%d.txt" % j)), "upper.txt")
        m.submit(t)
        kind[t.id], expect[t.id] = ("cmd", j), j + 3 + a.input_version

    for i in range(a.n):
        t = PythonTask(work, i, a.sleep)
        m.submit(t)
        kind[t.id], expect[t.id] = ("py", i), i * i + 7
        if cmd_every and cmd_next < a.cmd and i % cmd_every == 0:
            submit_cmd(cmd_next)
            cmd_next += 1
    while cmd_next < a.cmd:
        submit_cmd(cmd_next)
        cmd_next += 1
    for j in range(a.pyfiles):
        t = PythonTask(reverse_file, "in.txt", "rev.txt")
        t.add_input(m.declare_file(os.path.join(indir, "in_%d.txt" % j)), "in.txt")
        t.add_output(m.declare_file(os.path.join(outdir, "rev_%d.txt" % j)), "rev.txt")
        m.submit(t)
        kind[t.id], expect[t.id] = ("pyfile", j), j + 3 + a.input_version
    print("workload: submitted %d tasks" % len(kind), flush=True)

    if a.raise_when_running:
        deadline = time.monotonic() + 60
        while m.stats["running"] < a.raise_when_running and time.monotonic() < deadline:
            time.sleep(0.05)
        print("workload: %d task(s) running; raising" % m.stats["running"], flush=True)
        raise RuntimeError("workload: deliberate failure while tasks run")

    seen, errors, hosts, resumed = Counter(), [], Counter(), 0
    checksum = 0
    per_task = {}
    while not m.empty():
        t = m.wait(5)
        if t is None:
            continue
        seen[t.id] += 1
        if seen[t.id] > 1:
            errors.append("task %s returned %d times" % (t.id, seen[t.id]))
            continue
        if t.id not in kind:
            errors.append("unknown task id %s" % t.id)
            continue
        hosts[str(t.hostname)] += 1
        resumed += bool(t.resumed)
        k, idx = kind[t.id]
        per_task["%s-%d" % (k, idx)] = {"host": t.hostname, "resumed": bool(t.resumed), "id": t.id}
        if not t.successful():
            errors.append("task %s (%s %d) failed: %s %s exit %s\n%s"
                          % (t.id, k, idx, t.result, t.reason, t.exit_code, t.std_output))
            continue
        if k == "py":
            v = t.output
        elif k == "pyfile":
            v = t.output
        else:
            with open(os.path.join(outdir, "count_%d.txt" % idx)) as f:
                v = int(f.read())
        if v != expect[t.id]:
            errors.append("task %s (%s %d): got %r, expected %r" % (t.id, k, idx, v, expect[t.id]))
        checksum += v
    missing = sorted(set(kind) - set(seen))
    if missing:
        errors.append("tasks never returned: %s" % missing[:20])
    summary = {"tasks": len(kind), "returned": sum(seen.values()), "checksum": checksum, "hosts": dict(hosts),
               "resumed": resumed, "errors": errors, "per_task": per_task}
    with open(os.path.join(a.outdir, "summary.json"), "w") as f:
        json.dump(summary, f)
    m.close()
    for e in errors:
        print("ERROR:", e, file=sys.stderr)
    print("WORKLOAD %s tasks=%d checksum=%d resumed=%d hosts=%s"
          % ("FAILED" if errors else "OK", len(kind), checksum, resumed,
             ",".join("%s:%d" % kv for kv in sorted(hosts.items()))), flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
