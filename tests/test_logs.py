"""Logs you can find (issue 13): each worker keeps a log, the journal says where, launchers'
workers leave it in RUN_DIR/workers/, and `vinehpc logs` tells a task's story and shows a
worker's log -- on a real run with a failure, a retry and a worker killed under its task.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import vinehpc
from conftest import read_journal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def logs(*args, expect=0):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "vinehpc", "logs", *map(str, args)], env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=60)
    assert r.returncode == expect, r.stdout
    return r.stdout


FILLERS = 300


def poll(fn, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(0.05)
    pytest.fail("no %s within %s s" % (what, timeout))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished run: a task that succeeds, one that fails twice (one retry), one whose worker is killed."""
    run_dir = str(tmp_path_factory.mktemp("logs") / "run")
    m = vinehpc.Manager(local_workers=2, run_dir=run_dir)
    m.wait_for_workers(2, timeout=30)
    ok = vinehpc.Task("echo fine")
    bad = vinehpc.Task("echo BOOM-OUTPUT; exit 3").set_retries(1)
    long = vinehpc.Task("sleep 60")
    for t in (ok, bad, long):
        m.submit(t)
    d = poll(lambda: [r for r in read_journal(m, "dispatched") if r["task"] == long.id], 30, "dispatch")
    victim = d[0]["worker"]
    joined = {r["worker"]: r for r in read_journal(m, "worker joined")}
    os.kill(joined[victim]["pid"], signal.SIGKILL)
    poll(lambda: read_journal(m, "worker lost"), 30, "worker lost")
    m.cancel(long)       # requeued first in line: it would hold the other worker for a minute
    for i in range(FILLERS):    # a few hundred tasks, as a real run has
        m.submit(vinehpc.Task("echo filler %d" % i))
    got = {m.wait(30) for _ in range(3 + FILLERS)}
    assert {ok, bad, long} <= got and len(got) == 3 + FILLERS and None not in got, len(got)
    m.close()
    yield run_dir, ok, bad, long, victim, joined
    # the killed worker could not remove its work directory
    shutil.rmtree(os.path.dirname(joined[victim]["log"]), ignore_errors=True)


def test_each_worker_log_is_known_to_the_journal_and_collected(run):
    run_dir, ok, bad, long, victim, joined = run
    assert len(joined) == 2
    for wid, r in joined.items():
        assert r["log"].endswith("worker.log")
    lost = read_journal(run_dir, "worker lost")
    assert [r["worker"] for r in lost] == [victim]
    assert lost[0]["log"] == joined[victim]["log"]     # on loss too
    survivor = next(w for w in joined if w != victim)
    collected = os.path.join(run_dir, "workers", "%s-%d.log" % (joined[survivor]["host"], joined[survivor]["pid"]))
    text = open(collected).read()
    assert "joined the manager" in text and "the manager says exit" in text and "worker exits" in text
    # the killed one could not copy it: its log is still on its node, where the journal says
    assert not os.path.exists(os.path.join(run_dir, "workers", "%s-%d.log" % (joined[victim]["host"],
                                                                              joined[victim]["pid"])))
    assert "joined the manager" in open(joined[victim]["log"]).read()


def test_logs_of_a_failed_task_tell_its_story(run):
    run_dir, ok, bad, long, victim, joined = run
    out = logs(run_dir, "--task", bad.id)
    assert out.startswith("task %d: echo BOOM-OUTPUT; exit 3" % bad.id), out
    assert "attempt 1 sent to worker" in out and "attempt 2 sent to worker" in out
    assert "retry" in out and "exit code 3" in out
    assert "| BOOM-OUTPUT" in out                         # its output
    assert out.count("INFO task %d: failed" % bad.id) == 2, out   # each worker's log line for it


def test_logs_of_a_task_whose_worker_was_lost(run):
    run_dir, ok, bad, long, victim, joined = run
    out = logs(run_dir, "--task", long.id)
    assert "worker %d lost while it ran there" % victim in out, out
    assert "cancelled" in out
    assert "worker %d (" % victim in out and joined[victim]["log"] in out


def test_logs_of_a_worker_and_the_list(run):
    run_dir, ok, bad, long, victim, joined = run
    survivor = next(w for w in joined if w != victim)
    out = logs(run_dir, "--worker", survivor)
    assert os.path.join(run_dir, "workers") in out and "worker exits" in out, out
    out = logs(run_dir)
    assert "worker %d:" % victim in out and "lost:" in out
    assert "worker %d:" % survivor in out


def test_logs_of_a_task_from_a_successful_run(run):
    run_dir, ok, bad, long, victim, joined = run
    out = logs(run_dir, "--task", ok.id)
    assert "echo fine" in out and "done on worker" in out and "| fine" in out, out


def test_logs_of_a_pilot_run_directory(run, tmp_path):
    """A pilot's run directory: one journal per manager (manager-N/), the workers' logs at its top."""
    run_dir, ok, bad, long, victim, joined = run
    pilot = tmp_path / "pilot-x"
    (pilot / "manager-0").mkdir(parents=True)
    shutil.copy(os.path.join(run_dir, "transactions.jsonl"), pilot / "manager-0" / "transactions.jsonl")
    shutil.copytree(os.path.join(run_dir, "workers"), pilot / "workers")
    out = logs(pilot, "--task", bad.id)
    assert "| BOOM-OUTPUT" in out and str(pilot / "workers") in out, out
    assert logs(tmp_path / "nothing-here", expect=2).startswith("vinehpc logs: no transactions.jsonl")
