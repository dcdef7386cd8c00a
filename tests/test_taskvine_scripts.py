"""TaskVine-style scripts (tests/taskvine_scripts/*.py, written by us in TaskVine's style with
`import vinehpc as vine`) run unchanged under `vinehpc run -n 2` and under an mpiexec pilot.

Each script asserts its own results and exits 0; a failure names the script and shows its
output.  The `mpi` fixture (tests/slurm_fixture.py) finds MPICH's mpiexec and skips when it
cannot -- in CI (CI=true) it fails instead.
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = sorted(glob.glob(os.path.join(HERE, "taskvine_scripts", "*.py")))
ROOT = os.path.dirname(HERE)
TIMEOUT = 120       # each script is meant to take seconds; this is the deadline, not the budget


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_", "PMIX_", "VINEHPC_"))}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["VINEHPC_MANAGER_HOST"] = "127.0.0.1"
    return env


def _run(argv, cwd):
    try:
        r = subprocess.run(argv, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=TIMEOUT)
    except subprocess.TimeoutExpired as e:
        out = e.output.decode(errors="replace") if isinstance(e.output, bytes) else (e.output or "")
        pytest.fail("%s did not finish within %d s:\n%s" % (" ".join(argv), TIMEOUT, out[-4000:]), pytrace=False)
    assert r.returncode == 0, "%s exited %d:\n%s" % (" ".join(argv), r.returncode, r.stdout[-4000:])
    return r.stdout


def _id(path):
    return os.path.basename(path)[:-3]


def test_the_folder_has_scripts():
    assert SCRIPTS, "no script in tests/taskvine_scripts/"


@pytest.mark.timeout(TIMEOUT + 30)
@pytest.mark.parametrize("script", SCRIPTS, ids=_id)
def test_script_under_vinehpc_run(script, tmp_path):
    _run([sys.executable, "-m", "vinehpc", "run", "-n", "2", script], tmp_path)


@pytest.mark.timeout(TIMEOUT + 60)
@pytest.mark.parametrize("script", SCRIPTS, ids=_id)
def test_script_under_an_mpiexec_pilot(script, tmp_path, mpi):
    _run([mpi, "-n", "3", sys.executable, "-m", "vinehpc", "pilot", script], tmp_path)
    # the pilot's workers left their logs in the run directory (node-local disks go with the allocation)
    logs = glob.glob(str(tmp_path / "vine-run-info" / "pilot-*" / "workers" / "*.log"))
    assert logs and all(os.path.getsize(f) > 0 for f in logs), "no worker log collected under %s" % tmp_path
