"""The conformance suite (tests/conformance/suite.py) under every way of starting workers.

One script checks the user-visible contract itself and prints "CONFORMANCE OK <n> checks";
here it runs, unchanged, under each launcher, with two workers of one core each:

    local-run           vinehpc run -n 2 suite.py
    standalone-workers  suite.py --standalone RUN_DIR (Manager(port=0)) + two `vinehpc worker`
                        processes started here from the address and secret it leaves in RUN_DIR
    mpiexec-pilot       mpiexec -n 3 vinehpc pilot suite.py (pip MPICH, no Slurm)
    slurm-srun          sbatch jobscripts/vine.sh suite.py on the Slurm test bed (srun --mpi=pmi2)
    slurm-mpiexec       the same with VINEHPC_LAUNCHER=mpiexec

Each mode then checks, from outside, that the suite passed, that its two workers joined, and
that no process of the run is left. In CI (CI=true) a missing MPI or Slurm fails, never skips
(slurm_fixture.require).
"""
from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import time
import types

import pytest

from conftest import poll, read_journal, worker_cmd
from test_pilot import (_mpiexec_pilot, assert_no_strays, job_env, journal_of, manager_address, run_dir_of,
                        submit_pilot)

HERE = os.path.dirname(os.path.abspath(__file__))
SUITE = os.path.join(HERE, "conformance", "suite.py")
PY = sys.executable
RUN_TIMEOUT = 150        # seconds one run of the suite may take, launcher included (it needs ~10)
OK_LINE = re.compile(r"^CONFORMANCE OK (\d+) checks", re.M)


class Outcome:
    """What one mode produced: exit status, output, journal records, and what finds strays."""

    def __init__(self, rc, out, recs, jobid=None):
        self.rc, self.out, self.recs, self.jobid = rc, out, recs, jobid

    def __repr__(self):
        return "rc %s\n--- output ---\n%s" % (self.rc, self.out)


def _run(argv, *, cwd, env, timeout=RUN_TIMEOUT):
    try:
        return subprocess.run(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail("%s did not end within %s s\n%s" % (" ".join(argv), timeout, e.output), pytrace=False)


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VINEHPC_", "SLURM_", "PMI_", "PMIX_"))}
    env.update(PYTHONUNBUFFERED="1", VINEHPC_PROGRESS="never", **extra)
    return env


# ------------------------------------------------------------------ the modes
def local_run(request, tmp_path):
    runs = tmp_path / "runs"
    r = _run([PY, "-m", "vinehpc", "run", "-n", "2", SUITE], cwd=tmp_path,
             env=_env(VINEHPC_RUN_DIR=str(runs)))
    dirs = [d for d in glob.glob(str(runs / "*")) if os.path.basename(d) != "latest"]   # the link to it
    assert len(dirs) == 1, (dirs, r.stdout)
    return Outcome(r.returncode, r.stdout, read_journal(dirs[0]))


def standalone_workers(request, tmp_path):
    run_dir = tmp_path / "run"
    procs = []
    with open(tmp_path / "suite.out", "w+") as out:
        try:
            suite = subprocess.Popen([PY, SUITE, "--standalone", str(run_dir)], cwd=tmp_path, env=_env(),
                                     stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
            procs.append(suite)
            # the manager journals its address once it listens; its secret file is written before
            started = poll(lambda: read_journal(run_dir, "manager started") or suite.poll() is not None,
                           30, "the manager's address in %s" % run_dir)
            assert started is not True, "the suite ended before its manager started:\n%s" % _read(out)
            port = int(started[0]["address"].rsplit(":", 1)[1])
            contact = types.SimpleNamespace(port=port, secret_file=str(run_dir / "secret"))
            assert os.path.exists(contact.secret_file)
            for i in range(2):
                with open(tmp_path / ("worker%d.out" % i), "w") as wout:
                    procs.append(subprocess.Popen(worker_cmd(contact), env=_env(), stdin=subprocess.DEVNULL,
                                                  stdout=wout, stderr=subprocess.STDOUT, start_new_session=True))
            try:
                rc = suite.wait(RUN_TIMEOUT)
            except subprocess.TimeoutExpired:
                pytest.fail("the suite did not end within %s s\n%s" % (RUN_TIMEOUT, _read(out)), pytrace=False)
            # the manager closed: it told its workers to exit
            for w in procs[1:]:
                try:
                    assert w.wait(15) == 0, "a standalone worker exited %s" % w.returncode
                except subprocess.TimeoutExpired:
                    pytest.fail("a standalone worker still runs 15 s after its manager closed", pytrace=False)
            return Outcome(rc, _read(out), read_journal(run_dir))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(10)


def _read(f):
    f.flush()
    f.seek(0)
    return f.read()


def mpiexec_pilot(request, tmp_path):
    mpi = request.getfixturevalue("mpi")
    r = _mpiexec_pilot(mpi, tmp_path, SUITE, n=3, env={"VINEHPC_PROGRESS": "never"}, timeout=RUN_TIMEOUT)
    assert "3 ranks on 1 node(s), 2 worker(s)" in r.stdout, r.stdout
    return Outcome(r.returncode, r.stdout, journal_of(run_dir_of(tmp_path, SUITE)))


def slurm_pilot(launcher):
    def run(request, tmp_path):
        cluster = request.getfixturevalue("slurm_cluster")
        mpi = request.getfixturevalue("mpi")
        # n1: rank 0 (the manager and the suite); n2: two workers of one core
        env = job_env(VINEHPC_WORKERS_PER_NODE=2, VINEHPC_CORES_PER_WORKER=1)
        if launcher == "mpiexec":
            env.update(VINEHPC_LAUNCHER="mpiexec", VINEHPC_MPIEXEC=mpi)
        job = submit_pilot(cluster, tmp_path, SUITE, env=env, timeout=RUN_TIMEOUT)
        recs = journal_of(job.run_dir)
        assert {r["host"] for r in recs if r.get("event") == "worker joined"} == {"n2"}, job
        return Outcome(job.rc, job.out, recs, jobid=job.jobid)
    return run


MODES = {
    "local-run": local_run,
    "standalone-workers": standalone_workers,
    "mpiexec-pilot": mpiexec_pilot,
    "slurm-srun": slurm_pilot("srun"),
    "slurm-mpiexec": slurm_pilot("mpiexec"),
}


@pytest.mark.timeout(RUN_TIMEOUT + 60)
@pytest.mark.parametrize("mode", list(MODES))
def test_conformance(mode, request, tmp_path):
    t0 = time.monotonic()
    res = MODES[mode](request, tmp_path)
    wall = time.monotonic() - t0
    ok = OK_LINE.search(res.out)
    failed = re.search(r"^CONFORMANCE FAILED: .*$", res.out, re.M)
    assert res.rc == 0 and ok and not failed, "%s: %s\n%r" % (mode, failed.group(0) if failed else "no OK line", res)
    joined = [r for r in res.recs if r.get("event") == "worker joined"]
    assert len(joined) == 2 and all(r["resources"]["cores"] == 1 for r in joined), joined
    assert_no_strays(res.jobid, [manager_address(res.recs), str(tmp_path)], what="(%s)" % mode)
    sys.stderr.write("conformance[%s]: %s checks, %.1f s wall\n" % (mode, ok.group(1), wall))


BROKEN = """
import runpy, sys
from vinehpc.task import PythonTask
PythonTask.output = property(lambda self: "not the value")     # the contract broken on the manager's side
sys.argv = [%r]
runpy.run_path(%r, run_name="__main__")
""" % (SUITE, SUITE)


@pytest.mark.timeout(RUN_TIMEOUT + 60)
def test_suite_reports_a_broken_contract(tmp_path):
    """The suite checks results itself: a wrong PythonTask value makes it fail, naming the check."""
    script = tmp_path / "broken.py"
    script.write_text(BROKEN)
    r = _run([PY, "-m", "vinehpc", "run", "-n", "2", str(script)], cwd=tmp_path,
             env=_env(VINEHPC_RUN_DIR=str(tmp_path / "runs")))
    assert r.returncode == 1, r.stdout
    assert re.search(r"^CONFORMANCE FAILED: PythonTask 0 output \| 'not the value'$", r.stdout, re.M), r.stdout
    assert not OK_LINE.search(r.stdout), r.stdout
