#!/usr/bin/env python3
"""The conformance suite: the user-visible contract of vinehpc, checked by one script that
runs unchanged under every way of starting workers (DESIGN.md, habit 8).

    vinehpc run -n 2 suite.py                       local workers
    mpiexec -n 3 vinehpc pilot suite.py             the MPI pilot
    sbatch jobscripts/vine.sh suite.py              the pilot under Slurm
    python suite.py --standalone RUN_DIR            Manager(port=0): someone else starts the workers
                                                    (vinehpc worker ADDRESS --secret-file RUN_DIR/secret)

It expects `--workers N` workers (default 2; any number of cores each) and checks every
result itself, through the public API (and the run's journal, RUN_DIR/transactions.jsonl,
where the contract is a record: the "no worker is large enough" warning). Every wait is
bounded. The last line is "CONFORMANCE OK <n> checks" (exit 0) or "CONFORMANCE FAILED:
<what>" (exit 1).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback

import vinehpc
from vinehpc import Executor, Manager, PythonTask, RemoteTraceback, Task, TaskError

WAIT = 30.0          # seconds any one group of tasks may take to come back


class Failed(Exception):
    """A check did not hold; the message says which."""


class Checks:
    def __init__(self):
        self.n = 0

    def __call__(self, cond, what, *detail):
        self.n += 1
        if not cond:
            raise Failed(what + ("".join(" | %r" % (d,) for d in detail)))


check = Checks()


# ------------------------------------------------------------------ task bodies (sent by value)
def square(x):
    return x * x


def sleepy(x, seconds):
    time.sleep(seconds)
    return x


def raise_value_error(x):
    raise ValueError("conformance: bad value %r" % (x,))


def sum_lines(path):
    """A PythonTask with an input file: runs in its sandbox, where `path` is linked."""
    with open(path) as f:
        return sum(int(line) for line in f if line.strip())


# ------------------------------------------------------------------ helpers
def collect(m, tasks, timeout=WAIT) -> dict:
    """Wait until exactly `tasks` came back from m.wait(), each once -> {id: task}.

    A task returned twice, or one not in the group, fails the suite."""
    want = {t.id: t for t in tasks}
    got = {}
    deadline = time.monotonic() + timeout
    while len(got) < len(want):
        left = deadline - time.monotonic()
        if left <= 0:
            raise Failed("timeout: %d of %d tasks back after %.0f s (missing %s; stats %s)"
                         % (len(got), len(want), timeout, sorted(set(want) - set(got))[:10], m.stats))
        t = m.wait(min(left, 2.0))
        if t is None:
            continue
        check(t.id in want, "wait() returned a task of this group", t.id, sorted(want))
        check(t.id not in got, "wait() returned a task once", t.id)
        check(t is want[t.id], "wait() returns the submitted Task object itself", t.id)
        got[t.id] = t
    return got


def journal(m, event=None) -> list:
    path = os.path.join(m.run_dir, "transactions.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    return [r for r in recs if event is None or r.get("event") == event]


def poll(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise Failed("timeout after %.0f s waiting for %s" % (timeout, what))
        time.sleep(0.05)


def started_event():
    """(on_start callback, threading.Event set when the task is sent to a worker)."""
    ev = threading.Event()
    return (lambda task: ev.set()), ev


# ------------------------------------------------------------------ the contract
def results_exactly_once(m, data):
    py = [PythonTask(square, i) for i in range(20)]
    cmd = [Task("echo cmd $((%d * 3))" % i) for i in range(10)]
    for t in py + cmd:
        tid = m.submit(t)
        check(isinstance(tid, int) and tid == t.id, "submit returns the task's id", tid, t.id)
    got = collect(m, py + cmd)
    check(len({t.id for t in py + cmd}) == 30, "task ids are distinct")
    for i, t in enumerate(py):
        check(t.successful() and t.result == "success", "PythonTask %d succeeded" % i, t.result, t.reason)
        check(t.output == i * i, "PythonTask %d output" % i, t.output)
        check(t.exception is None, "a successful PythonTask has no exception")
        check(t.worker is not None and t.hostname, "a task says where it ran", t.worker, t.hostname)
    for i, t in enumerate(cmd):
        check(t.successful() and t.exit_code == 0, "command task %d succeeded" % i, t.exit_code, t.std_output)
        check(t.std_output.strip() == "cmd %d" % (i * 3), "command task %d stdout" % i, t.std_output)
    check(m.wait(0.2) is None and m.empty(), "nothing left after every task came back")
    return got


def files(m, data):
    # a temp chain: producer -> (stays on the workers) -> two consumers; one writes a file back
    temp = m.declare_temp()
    producer = Task("seq 1 10 > nums.txt").add_output(temp, "nums.txt")
    summed = os.path.join(data, "sum.txt")
    consumer = (Task("awk '{s += $1} END {print s}' nums.txt > sum.txt")
                .add_input(temp, "nums.txt").add_output(m.declare_file(summed), "sum.txt"))
    py_consumer = PythonTask(sum_lines, "nums.txt").add_input(temp, "nums.txt")
    # a directory input (sent as a tree) and a buffer input
    tree = os.path.join(data, "tree")
    os.makedirs(os.path.join(tree, "sub"))
    with open(os.path.join(tree, "a.txt"), "w") as f:
        f.write("alpha\n")
    with open(os.path.join(tree, "sub", "b.txt"), "w") as f:
        f.write("beta\n")
    dir_task = Task("cat d/a.txt d/sub/b.txt").add_input(m.declare_file(tree), "d")
    buf_task = Task("cat buf.txt; wc -c < buf.txt").add_input(m.declare_buffer(b"in a buffer\n"), "buf.txt")
    # the producer is submitted first (a temp nobody is producing is an error, not a wait);
    # its consumers then wait for it
    for t in (producer, consumer, py_consumer, dir_task, buf_task):
        m.submit(t)
    collect(m, [consumer, py_consumer, producer, dir_task, buf_task])
    for t in (producer, consumer, dir_task, buf_task):
        check(t.successful(), "file task %s succeeded" % t.command, t.result, t.reason, t.std_output)
    check(py_consumer.successful() and py_consumer.output == 55, "a PythonTask reads a temp input",
          py_consumer.result, py_consumer.reason)
    with open(summed) as f:
        check(f.read() == "55\n", "the consumer's output file is back on the manager's side")
    check(dir_task.std_output == "alpha\nbeta\n", "a directory input arrives as a tree", dir_task.std_output)
    check(buf_task.std_output.split() == ["in", "a", "buffer", "12"], "a buffer input arrives as bytes",
          buf_task.std_output)


def failures(m, data):
    cmd = Task("echo about to fail; exit 3").set_retries(1)
    py = PythonTask(raise_value_error, 7).set_retries(2)
    slow_cmd = Task("sleep 30").set_time_max(1)
    slow_py = PythonTask(sleepy, 0, 30).set_time_max(1)
    t0 = time.monotonic()
    for t in (cmd, py, slow_cmd, slow_py):
        m.submit(t)
    collect(m, [cmd, py, slow_cmd, slow_py])
    elapsed = time.monotonic() - t0
    # a failing command: data, not an exception; TaskVine's result: it ran to its end ("success")
    check(not cmd.successful() and cmd.completed() and cmd.result == "success",
          "a command exiting non-zero is completed, not successful", cmd.result)
    check(cmd.exit_code == 3, "its exit code comes back", cmd.exit_code)
    check("about to fail" in cmd.std_output, "its output comes back", cmd.std_output)
    check(cmd.attempts == 2, "a failing command used its retries", cmd.attempts)
    # a raising PythonTask: the exception itself, the remote traceback as its cause
    check(not py.successful() and py.result == "failed", "a raising PythonTask is 'failed'", py.result)
    check(py.attempts == 3, "a raising PythonTask used its retries", py.attempts)
    exc = py.exception
    check(type(exc) is ValueError and "bad value 7" in str(exc), "exception is the remote ValueError", exc)
    tb = exc.__cause__
    check(isinstance(tb, RemoteTraceback) and "raise_value_error" in str(tb)
          and "ValueError" in str(tb), "the remote traceback is the exception's cause", tb)
    check(("task %s" % py.id) in str(tb) and py.hostname in str(tb), "the traceback names task and host", str(tb))
    check(py.output is exc, "output of a raising PythonTask is the exception (TaskVine)", py.output)
    try:
        py.output_or_raise()
    except TaskError as e:
        check(e.__cause__ is exc, "output_or_raise raises TaskError from the remote exception", e.__cause__)
    else:
        raise Failed("output_or_raise of a raising PythonTask did not raise")
    # over time_max: killed, reported as exhaustion, soon
    for t in (slow_cmd, slow_py):
        check(t.result == "resource exhaustion", "a task over time_max is 'resource exhaustion'", t.result)
        check((t.reason or "").startswith("time: ") and "> 1 s allocated" in t.reason,
              "the reason names the time limit", t.reason)
    check(elapsed < 15, "tasks over a 1 s time_max come back within 15 s", elapsed)


def cancel_and_oversized(m, data):
    workers = m.workers()
    biggest = max(w["resources"]["cores"] for w in workers)
    # a task no worker can hold: reported (a journal warning), others pass it, it never runs
    big = Task("echo never").set_cores(biggest + 1)
    m.submit(big)
    # occupy every worker (pinned, all its cores), then queue a task and cancel it
    busy, events = [], []
    for w in workers:
        on_start, ev = started_event()
        t = Task("sleep 3").set_cores(w["resources"]["cores"]).set_category("conformance-busy")
        m.submit(t, worker=w["id"], on_start=on_start)
        busy.append(t)
        events.append(ev)
    for ev in events:
        check(ev.wait(WAIT), "on_start is called when a task is sent to a worker")
    queued = Task("echo never").set_category("conformance-queued")
    m.submit(queued)
    m.cancel(queued)
    got = collect(m, [queued], timeout=10)
    check(got[queued.id].result == "cancelled", "a cancelled task comes back 'cancelled'", queued.result)
    check(not any(t.completed() for t in busy), "the cancelled task came back before the running ones")
    warned = poll(lambda: [r for r in journal(m, "warning") if r.get("task") == big.id], 10,
                  "the journal's warning about the oversized task")
    check("large enough" in warned[0].get("reason", ""), "the warning says no worker is large enough", warned)
    collect(m, busy)
    for t in busy:
        check(t.successful(), "tasks submitted after an oversized one still run", t.result, t.reason)
    check(not big.completed(), "the oversized task is still queued, not run")
    m.cancel(big.id)
    collect(m, [big], timeout=10)
    check(big.result == "cancelled", "cancel by id", big.result)
    check(not [r for r in journal(m, "dispatched") if r.get("task") in (big.id, queued.id)],
          "neither the oversized nor the cancelled task was ever sent to a worker")


def executor(m, data):
    ex = Executor(manager=m)
    try:
        items = list(range(30))
        check(list(ex.map(square, items, timeout=WAIT)) == [x * x for x in items], "Executor.map")
        fut = ex.submit(raise_value_error, "x")
        try:
            fut.result(timeout=WAIT)
        except ValueError as e:
            check(type(e) is ValueError and "bad value 'x'" in str(e), "the remote exception re-raised", e)
            check(isinstance(e.__cause__, RemoteTraceback), "with the remote traceback as cause", e.__cause__)
        else:
            raise Failed("the future of a raising call returned a value")
        slow = ex.submit(sleepy, 42, 1.5)
        poll(slow.running, WAIT, "the future to be RUNNING once dispatched")
        check(not slow.done() and not slow.cancel(), "a running future cannot be cancelled")
        check(slow.result(timeout=WAIT) == 42, "the running future's result")
        done, _ = cf.wait([ex.submit(square, 9)], timeout=WAIT)
        check(len(done) == 1 and done.pop().result() == 81, "concurrent.futures.wait on a vinehpc future")
    finally:
        ex.shutdown(wait=True)
    check(not m.closed, "shutting down an Executor leaves the shared Manager open")
    check(m.wait(0.2) is None and m.empty(), "the Executor's tasks never come out of Manager.wait()")


def stats_and_workers(m, n_workers):
    ws = m.workers()
    check(len(ws) == n_workers, "workers() lists every connected worker", ws)
    check(len({w["id"] for w in ws}) == n_workers, "worker ids are distinct", ws)
    for w in ws:
        check(w["host"] and w["resources"]["cores"] >= 1 and w["running"] == 0,
              "a worker's host, cores, and no task running at the end", w)
    s = m.stats
    check(s["workers"] == n_workers and s["running"] == 0 and s["waiting"] == 0, "stats at the end", s)
    check(s["submitted"] == s["done"] + s["failed"] and s["done"] > 0 and s["failed"] > 0,
          "stats: every submitted task done or failed", s)


def journal_once(m):
    done = [r["task"] for r in journal(m) if r.get("event") in ("done", "failed")]
    check(len(done) == len(set(done)), "the journal records each task's end once")


# ------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2, help="workers to wait for (default 2)")
    ap.add_argument("--standalone", metavar="RUN_DIR",
                    help="Manager(port=0, run_dir=RUN_DIR) on loopback; workers are started by someone else")
    a = ap.parse_args(argv)
    data = tempfile.mkdtemp(prefix="vinehpc-conformance-")
    m = None
    t0 = time.monotonic()
    try:
        if a.standalone:
            m = Manager(port=0, host="127.0.0.1", run_dir=a.standalone)
        else:
            m = Manager()      # the launcher's: `vinehpc run`, `vinehpc pilot`
        try:
            m.wait_for_workers(a.workers, timeout=60)
        except TimeoutError as e:
            raise Failed(str(e))
        check(m.workers() and len(m.workers()) == a.workers, "the workers are connected")
        for step in (results_exactly_once, files, failures, cancel_and_oversized, executor):
            step(m, data)
        stats_and_workers(m, a.workers)
        journal_once(m)
    except Failed as e:
        print("CONFORMANCE FAILED: %s" % e, flush=True)
        return 1
    except BaseException as e:
        traceback.print_exc()
        print("CONFORMANCE FAILED: %s: %s" % (type(e).__name__, e), flush=True)
        return 1
    finally:
        if m is not None:
            m.close()
        shutil.rmtree(data, ignore_errors=True)
    print("CONFORMANCE OK %d checks in %.1f s (vinehpc %s)" % (check.n, time.monotonic() - t0,
                                                              vinehpc.__version__), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
