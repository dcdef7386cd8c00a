"""The walltime warning (issue 17): drain requests, the grace, and what is left "not run".

1. The request file (vinehpc/drain.py): authenticated, consumed once, bound to its job.
2. The end of the grace on a real manager: a task still running is cut, recorded "not run",
   never returned as a failure; `vinehpc drain` by hand on a `vinehpc run`.
3. On the two-node Slurm test bed, the real jobscripts/vine.sh with srun and with mpiexec:
   the warning (`scancel --signal=USR1 --batch`, which is what `--signal=B:USR1@N` delivers)
   lets running tasks finish and a resubmission runs only the rest; a warning that comes before
   the pilot is up drains it at once.
"""
from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import textwrap
import time

import cloudpickle
import psutil
import pytest

import vinehpc
from vinehpc import drain
from vinehpc.protocol import auth

from conftest import assert_no_survivors, journal_tail, poll, process_tree, read_journal, tree_running
from test_pilot import (WORKLOAD, BackgroundPilot, assert_no_strays, events, job_env, journal_of, manager_address,
                        sessions, submit_pilot, tail, workload_line)

cloudpickle.register_pickle_by_value(sys.modules[__name__])    # workers cannot import this module

PY = sys.executable


# ------------------------------------------------------------------ 1. the request file
@pytest.fixture
def run_dir(tmp_path):
    d = str(tmp_path / "run")
    return d, drain.ensure_key(d)


def test_request_is_taken_once_and_recorded(run_dir):
    d, key = run_dir
    made = drain.write_request(d, key, grace=7, why="USR1", job="42")
    path = os.path.join(d, drain.REQUEST)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    got = drain.take_request(d, key, job="42")
    assert got == made and got["grace"] == 7.0 and got["why"] == "USR1"
    assert not os.path.exists(path) and not os.path.exists(path + ".taken")
    assert drain.take_request(d, key, job="42") is None
    with open(os.path.join(d, drain.CONSUMED)) as f:
        assert f.read().split() == [made["nonce"]]


def _refused(d, key, match, **kw):
    with pytest.raises(drain.RequestRefused, match=match):
        drain.take_request(d, key, **kw)
    assert not os.path.exists(os.path.join(d, drain.REQUEST)), "a refused request must be deleted"
    assert not os.path.exists(os.path.join(d, drain.CONSUMED)), "a refused request must not be recorded"


def test_forged_hmac_is_refused(run_dir):
    d, key = run_dir
    drain.write_request(d, auth.new_secret(), grace=1)       # someone without the run's key
    _refused(d, key, "HMAC")


def test_changed_field_is_refused(run_dir):
    d, key = run_dir
    drain.write_request(d, key, grace=600)
    path = os.path.join(d, drain.REQUEST)
    with open(path) as f:
        req = json.load(f)
    req["grace"] = 0.0
    with open(path, "w") as f:
        json.dump(req, f)
    _refused(d, key, "HMAC")


def test_malformed_request_is_refused(run_dir):
    d, key = run_dir
    for text in ("not json", json.dumps({"grace": 1}), json.dumps(dict.fromkeys(drain.FIELDS, 3))):
        with auth.create_private(os.path.join(d, drain.REQUEST)) as f:
            f.write(text)
        _refused(d, key, "not a drain request")


def test_request_readable_or_writable_by_others_is_refused(run_dir):
    d, key = run_dir
    for mode in (0o644, 0o620, 0o606):
        drain.write_request(d, key)
        os.chmod(os.path.join(d, drain.REQUEST), mode)
        _refused(d, key, "mode")


def test_symlinked_request_is_refused(run_dir, tmp_path):
    d, key = run_dir
    other = str(tmp_path / "elsewhere")
    drain.write_request(other, drain.ensure_key(other))
    os.symlink(os.path.join(other, drain.REQUEST), os.path.join(d, drain.REQUEST))
    _refused(d, key, "symbolic link")
    assert os.path.exists(os.path.join(other, drain.REQUEST))


def test_replay_of_a_consumed_request_is_refused(run_dir):
    d, key = run_dir
    drain.write_request(d, key, job="7")
    path = os.path.join(d, drain.REQUEST)
    with open(path, "rb") as f:
        saved = f.read()
    assert drain.take_request(d, key, job="7") is not None
    with auth.create_private(path) as f:      # the same bytes put back, as its owner would
        f.write(saved.decode())
    with pytest.raises(drain.RequestRefused, match="replay"):
        drain.take_request(d, key, job="7")
    assert not os.path.exists(path)


def test_request_of_another_job_or_from_before_the_run_is_refused(run_dir):
    d, key = run_dir
    drain.write_request(d, key, job="100")
    _refused(d, key, "job 100", job="101")
    made = drain.write_request(d, key)                     # by hand, no job: only for a run going on
    _refused(d, key, "before this run started", job="101", since=made["created"] + 1)
    drain.write_request(d, key)
    assert drain.take_request(d, key, job="101", since=made["created"]) is not None


def test_request_copied_from_another_run_directory_is_refused(run_dir, tmp_path):
    d, key = run_dir
    other = str(tmp_path / "other")
    os.makedirs(other)
    drain.write_request(other, key)                          # same key, other run directory
    os.rename(os.path.join(other, drain.REQUEST), os.path.join(d, drain.REQUEST))
    _refused(d, key, "made for")


def test_run_key_is_made_once_and_must_be_private(tmp_path):
    d = str(tmp_path / "k")
    k1 = drain.ensure_key(d)
    assert drain.ensure_key(d) == k1 and drain.read_key(d) == k1
    assert stat.S_IMODE(os.stat(os.path.join(d, drain.KEY)).st_mode) == 0o600
    os.chmod(os.path.join(d, drain.KEY), 0o640)
    with pytest.raises(drain.RequestRefused, match="mode"):
        drain.ensure_key(d)


def test_grace_of_a_request():
    assert drain.grace_for("USR1", None, 60.0) == 60.0
    assert drain.grace_for("user", 3, 60.0) == 3.0
    assert drain.grace_for("TERM", None, 60.0) == drain.TERM_GRACE
    assert drain.grace_for("TERM", 1, 60.0) == 1.0


def test_watcher_acts_once_per_request_and_signal_and_logs_refusals(run_dir, caplog):
    d, key = run_dir
    calls = []
    w = drain.Watcher(d, key, lambda grace, why: calls.append((grace, why)), job="5")
    w.check()
    assert calls == []
    w.notify("USR1")
    drain.write_request(d, key, grace=2, why="user", job="5")
    w.check()
    assert calls == [(None, "USR1"), (2.0, "user")]
    drain.write_request(d, auth.new_secret(), job="5")
    with caplog.at_level(logging.WARNING, logger="vinehpc.drain"):
        w.check()
    assert calls == [(None, "USR1"), (2.0, "user")]
    assert "refused" in caplog.text and "HMAC" in caplog.text
    # the thread: a request is acted on within a few polls
    w.poll = 0.02
    w.start()
    try:
        drain.write_request(d, key, why="later", job="5")
        poll(lambda: len(calls) == 3, 10, "the watcher thread to take the request")
    finally:
        w.stop()
    assert calls[-1] == (None, "later")


def test_cli_writes_a_request_the_run_accepts(tmp_path):
    d = str(tmp_path / "cli-run")
    r = subprocess.run([PY, "-m", "vinehpc", "drain", d, "--grace", "4", "--job", "9", "--why", "USR1"],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    assert r.returncode == 0 and "job 9" in r.stdout, r.stdout
    got = drain.take_request(d, drain.read_key(d), job="9")
    assert got["grace"] == 4.0 and got["why"] == "USR1"
    r = subprocess.run([PY, "-m", "vinehpc", "drain", d, "--grace", "-1"], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=60)
    assert r.returncode == 2 and "grace" in r.stdout, r.stdout


# ------------------------------------------------------------------ 2. the end of the grace
def test_task_running_past_the_grace_is_cut_not_run_and_not_returned(make_manager):
    m = make_manager(local_workers=1)
    t = vinehpc.Task("sleep 60")
    m.submit(t)
    waiting = vinehpc.Task("true")
    m.submit(waiting)
    tree = poll(lambda: tree_running(m._local.pids(), "sleep"), 30, "the task's sleep to start", m=m)
    sleeps = [p for p in tree if _name(p) == "sleep"]      # read while it runs: a dead process has no name
    m.drain(0.3)
    t0 = time.monotonic()
    with pytest.raises(vinehpc.Resumable, match="2 task"):
        while True:               # the user's loop: nothing comes back, then Resumable
            got = m.wait(10)
            assert got is None or got.id not in (t.id, waiting.id), (got.result, got.reason)
            assert time.monotonic() - t0 < 20, journal_tail(m)
    # the I/O thread flushes the journal at the end of the loop turn that woke us
    poll(lambda: read_journal(m, "drained"), 10, "the drained record", m=m)
    recs = read_journal(m)
    cut = [r for r in recs if r.get("event") == "not run"]
    assert [r["task"] for r in cut] == [t.id], journal_tail(m)
    assert "cut by the walltime" in cut[0]["reason"] and "0.3 s grace" in cut[0]["reason"], cut
    drained = [r for r in recs if r.get("event") == "drained"]
    assert drained == [dict(drained[0], cut=[t.id], **{"not run": 2})], drained
    assert not [r for r in recs if r.get("event") in ("failed", "done")], journal_tail(m)
    # the task's process was killed (its worker lives on)
    assert_no_survivors(sleeps, timeout=10, what="the cut task's process")


def nap(started, seconds):
    open(started, "w").close()
    time.sleep(seconds)
    return seconds


def test_usr1_sent_to_a_worker_and_its_interpreters_kills_nothing(make_manager, tmp_path):
    """What the old vine.sh did to every process of the step: the worker and the interpreter
    running a PythonTask catch USR1 and go on (command tasks keep the default: README). Sent once
    the task runs: an interpreter still starting up has no handler yet (nothing sends it USR1 now)."""
    import signal
    m = make_manager(local_workers=1)
    started = str(tmp_path / "started")
    m.submit(vinehpc.PythonTask(nap, started, 2))
    poll(lambda: os.path.exists(started), 30, "the task to start", m=m)
    tree = process_tree(m._local.pids())
    assert len(tree) >= 2, tree          # the worker and at least its Python interpreter
    for p in tree:
        p.send_signal(signal.SIGUSR1)
    got = m.wait(30)
    assert got is not None and got.result == "success" and got.output == 2, (got and (got.result, got.reason))
    assert all(p.is_running() for p in tree if p.pid in m._local.pids())
    assert not read_journal(m, "worker lost"), journal_tail(m)


def _name(p) -> str:
    try:
        return p.name()
    except psutil.Error:       # gone since process_tree() listed it
        return ""


RUN_SCRIPT = textwrap.dedent("""
    import sys, vinehpc
    m = vinehpc.Manager(run_dir=sys.argv[1])
    for i in range(3):
        m.submit(vinehpc.Task("sleep 2; echo done %d" % i))
    try:
        while not m.empty():
            t = m.wait(5)
            if t is not None:
                print("returned", t.id, t.result, flush=True)
    except vinehpc.Resumable as e:
        print("resumable:", e, flush=True)
        raise
""")


def test_vinehpc_run_drained_by_hand_lets_the_running_task_finish(tmp_path):
    script = tmp_path / "three.py"
    script.write_text(RUN_SCRIPT)
    d = str(tmp_path / "run-by-hand")
    p = subprocess.Popen([PY, "-m", "vinehpc", "run", "-n", "1", str(script), d], cwd=str(tmp_path),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        poll(lambda: read_journal(d, "dispatched") or p.poll() is not None, 30, "the first task to start")
        assert p.poll() is None
        r = subprocess.run([PY, "-m", "vinehpc", "drain", d, "--grace", "30"], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=60)
        assert r.returncode == 0, r.stdout
        out, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 75, out
    recs = read_journal(d)
    assert [r["grace"] for r in recs if r.get("event") == "draining"] == [30.0], journal_tail(d)
    done = [r["task"] for r in recs if r.get("event") == "done"]
    assert len(done) >= 1 and "returned %d success" % done[0] in out, out
    assert not [r for r in recs if r.get("event") in ("failed", "not run")], journal_tail(d)
    assert "resumable: the manager stopped for the walltime; %d task(s) not run" % (3 - len(done)) in out, out


# ------------------------------------------------------------------ 3. the Slurm test bed
LAUNCHERS = ["srun", "mpiexec"]


def launcher_env(launcher, mpi, **extra):
    env = job_env(**extra)
    if launcher == "mpiexec":
        env.update(VINEHPC_LAUNCHER="mpiexec", VINEHPC_MPIEXEC=mpi)
    return env


def signal_batch_shell(jobid):
    """What `#SBATCH --signal=B:USR1@N` delivers: USR1 to the batch shell only."""
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(jobid)], check=True, timeout=30)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_warning_lets_running_tasks_finish_and_resubmission_runs_the_rest(slurm_cluster, mpi, tmp_path,
                                                                         launcher):
    outdir = tmp_path / "wl"
    n, n_cmd, sleep = 5, 1, 8
    total = n + n_cmd
    args = [str(outdir), "--n", n, "--cmd", n_cmd, "--sleep", sleep]
    # two workers of one core on n2: a PythonTask and the command task run when the warning comes
    env = launcher_env(launcher, mpi, VINEHPC_GRACE=40, VINEHPC_WORKERS_PER_NODE=2, VINEHPC_CORES_PER_WORKER=1)
    with BackgroundPilot(slurm_cluster, tmp_path, WORKLOAD, *args, env=env, timeout=120) as bg:
        bg.wait_journal(lambda rs: len(events(rs, "dispatched")) >= 2, 90, "two tasks running")
        signal_batch_shell(bg.jobid())
        t_signal = time.monotonic()
        bg.wait_journal(lambda rs: events(rs, "draining"), 30, "the manager to drain")
        t_draining = time.monotonic()
        job1 = bg.result(120)
        t_end = time.monotonic()
    sys.stderr.write("walltime[%s]: warning -> draining %.2f s, -> job end %.1f s\n"
                     % (launcher, t_draining - t_signal, t_end - t_signal))
    assert job1.rc == 75 and "RESUMABLE" in job1.out, job1
    assert "USR1 received" in job1.out and "asking the manager to drain" in job1.out, job1
    assert "drain requested (USR1)" in job1.out, job1
    recs = journal_of(job1.run_dir)
    draining = events(recs, "draining")
    assert len(draining) == 1 and draining[0]["grace"] == 40 and draining[0]["running"] == 2, tail(recs)
    at = recs.index(draining[0])
    running = ({r["task"] for r in events(recs[:at], "dispatched")}
               - {r["task"] for r in events(recs[:at], "done")})
    assert len(running) == 2, tail(recs)
    # they ran to their end within the grace and are recorded completed; nothing failed or was cut
    done = {r["task"]: r for r in events(recs[at:], "done")}
    assert set(done) == running, tail(recs)
    assert all(r["result"] == "success" and r["wall"] >= sleep - 0.5 for r in done.values()), done
    assert {r["task"] for r in events(recs, "completed")} >= running, tail(recs)
    assert not events(recs, "failed") and not events(recs, "not run"), tail(recs)
    assert not events(recs, "worker lost"), tail(recs)
    assert events(recs, "drained")[0]["cut"] == [], tail(recs)
    assert not set(r["task"] for r in events(recs[at:], "dispatched")), "dispatched after the warning"
    completed1 = {r["key"] for r in events(recs, "completed")}
    assert 2 <= len(completed1) < total
    assert_no_strays(job1.jobid, [manager_address(recs), str(tmp_path)])

    t2 = time.monotonic()
    job2 = submit_pilot(slurm_cluster, tmp_path, WORKLOAD, *args, env=env, timeout=150)
    sys.stderr.write("walltime[%s]: resubmission %.1f s\n" % (launcher, time.monotonic() - t2))
    assert job2.rc == 0, job2
    line = workload_line(job2.out)
    assert line["ok"] and line["tasks"] == total and line["resumed"] == len(completed1), job2
    s2 = sessions(journal_of(job2.run_dir))[-1]
    dispatched2 = {r["task"] for r in events(s2, "dispatched")}
    assert len(dispatched2) == total - len(completed1), tail(s2)
    assert {r["key"] for r in events(s2, "resumed")} == completed1, tail(s2)
    assert not {r["key"] for r in events(s2, "completed")} & completed1, tail(s2)


@pytest.mark.timeout(240)
def test_real_walltime_signal_lets_running_tasks_finish(slurm_cluster, mpi, tmp_path):
    """Slurm's own warning, `--signal=B:USR1@80` on a 2 minute job: due 40 s into the run, it
    comes up to 30 s before (slurmctld checks the limits periodically: seen 10 s into a run with
    @100), while 15 s tasks run back to back."""
    outdir = tmp_path / "wl"
    env = job_env(VINEHPC_GRACE=60, VINEHPC_WORKERS_PER_NODE=2, VINEHPC_CORES_PER_WORKER=1)
    job = submit_pilot(slurm_cluster, tmp_path, WORKLOAD, str(outdir), "--n", 30, "--sleep", 15, env=env,
                       timeout=180, extra=["--time=2", "--signal=B:USR1@80"])
    assert job.rc == 75 and "USR1 received" in job.out and "RESUMABLE" in job.out, job
    recs = journal_of(job.run_dir)
    draining = events(recs, "draining")
    assert len(draining) == 1 and draining[0]["running"] == 2, tail(recs)
    at = recs.index(draining[0])
    sys.stderr.write("walltime[--signal]: the warning came %.1f s after the manager started\n"
                     % (draining[0]["time"] - recs[0]["time"]))
    running = ({r["task"] for r in events(recs[:at], "dispatched")}
               - {r["task"] for r in events(recs[:at], "done")})
    done = {r["task"]: r for r in events(recs[at:], "done")}
    assert set(done) == running and all(r["result"] == "success" and r["wall"] >= 14.5
                                        for r in done.values()), tail(recs)
    assert running <= {r["task"] for r in events(recs, "completed")}, tail(recs)
    assert events(recs, "drained")[0]["cut"] == [] and not events(recs, "failed"), tail(recs)
    assert_no_strays(job.jobid, [manager_address(recs), str(tmp_path)])


GATE_PY = """#!/bin/sh
# VINEHPC_PYTHON for the early-warning test: `... pilot ...` waits until the test opens the gate
case " $* " in *" pilot "*)
    touch "$WALLTIME_GATE.waiting"
    i=0
    while [ ! -e "$WALLTIME_GATE.open" ]; do
        i=$((i + 1)); [ $i -gt 1200 ] && exit 3       # 60 s
        sleep 0.05
    done ;;
esac
exec %s "$@"
"""


@pytest.mark.timeout(180)
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_warning_before_the_pilot_is_up_drains_it_at_once(slurm_cluster, mpi, tmp_path, launcher):
    gate = str(tmp_path / "gate")
    wrapper = tmp_path / "gate-python"
    wrapper.write_text(GATE_PY % PY)
    wrapper.chmod(0o755)
    env = launcher_env(launcher, mpi, VINEHPC_GRACE=40, WALLTIME_GATE=gate)
    env["VINEHPC_PYTHON"] = str(wrapper)
    outdir = tmp_path / "wl"
    with BackgroundPilot(slurm_cluster, tmp_path, WORKLOAD, str(outdir), "--n", 4, env=env, timeout=120) as bg:
        # the ranks are launched but held before `vinehpc pilot` runs: the run is not up
        deadline = time.monotonic() + 90
        while not os.path.exists(gate + ".waiting"):
            assert bg.running() and time.monotonic() < deadline, "the pilot was never launched: %r" % (
                bg.result(1) if not bg.running() else "timeout")
            time.sleep(0.05)
        signal_batch_shell(bg.jobid())
        request = os.path.join(bg.run_dir, drain.REQUEST)
        poll(lambda: os.path.exists(request) or not bg.running(), 30, "vine.sh's drain request")
        assert bg.running()
        open(gate + ".open", "w").close()
        job = bg.result(120)
    assert job.rc == 75 and "RESUMABLE" in job.out, job
    assert "drain requested (USR1) before the run was up: no task will run" in job.out, job
    assert "Traceback" not in job.out and "User defined signal" not in job.out, job
    recs = journal_of(job.run_dir)
    assert [r["grace"] for r in events(recs, "draining")] == [0.0], tail(recs)
    assert events(recs, "drained") and not events(recs, "dispatched"), tail(recs)
    assert not os.path.exists(request)
    assert_no_strays(job.jobid, [manager_address(recs), str(tmp_path)])
