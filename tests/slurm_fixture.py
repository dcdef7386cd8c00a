"""Pytest plugin: a real two-node Slurm cluster on this host, and MPI from PyPI.

Load it from tests/conftest.py with ``pytest_plugins = ["slurm_fixture"]`` (tests/ is on
sys.path because it has no __init__.py). ``tests.slurm_fixture`` works too when the
repository root is on sys.path (``python -m pytest`` from the root, as tests/run.sh does).
The module uses no relative imports and finds its scripts through ``__file__``.

Fixtures (both session-scoped, both set up only when a test asks for them):

``slurm_cluster``
    Runs tests/slurm/up.sh (idempotent; installs slurmctld slurmd slurm-client munge with
    apt when missing) and yields a :class:`SlurmCluster` (nodes n1 and n2: two slurmd on
    this host). tests/slurm/down.sh runs at the end of the session, unless
    VINEHPC_SLURM_KEEP=1 (then the next session finds the cluster up in well under a second).
``mpi``
    pip-installs ``mpi4py`` and ``mpich`` into this interpreter when missing and returns the
    path of the wheel's ``mpiexec``. Under Slurm, MPICH ranks need ``srun --mpi=pmi2``.

``require(condition, reason)`` skips the test outside CI and fails it in CI (``CI=true``):
what the suite needs (root, apt, pip) must never be silently skipped where it is checked.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import uuid

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
UP_SH = os.path.join(HERE, "slurm", "up.sh")
DOWN_SH = os.path.join(HERE, "slurm", "down.sh")
LOG_DIR = "/var/log/vinehpc-slurm"
UP_TIMEOUT = 180
PIP_TIMEOUT = 240

# states after which a job never runs again (scontrol's JobState)
FINISHED_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
    "DEADLINE", "OUT_OF_MEMORY", "SPECIAL_EXIT", "REVOKED",
})


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes", "on")


def require(condition, reason: str) -> None:
    """Skip the current test unless `condition` holds -- but in CI (CI=true), fail it.

    Usable in tests, fixtures and at module level."""
    if condition:
        return
    if in_ci():
        pytest.fail("required in CI (CI=%s), but: %s" % (os.environ.get("CI"), reason), pytrace=False)
    pytest.skip(reason, allow_module_level=True)


# known noise on every start: no PMIx library (libpmix-dev not installed), no saved state
_LOG_NOISE = re.compile(r"pmix|PMIx|Could not open .* state file|Trying backup state save|to recover$")


def _tail(path: str, n: int = 25) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join([ln for ln in f if not _LOG_NOISE.search(ln.rstrip("\n"))][-n:])
    except OSError as e:
        return "(cannot read: %s)\n" % e


def _run(argv, timeout=30, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout, **kw)


def _parse_kv(line: str) -> dict:
    """'A=1 B=x y C=2' (one `scontrol -o` record) -> dict; values may contain spaces."""
    out = {}
    for m in re.finditer(r"(\S+?)=(.*?)(?=\s+\S+?=|$)", line.strip()):
        out[m.group(1)] = m.group(2)
    return out


class SlurmCluster:
    """Handle on the test cluster started by tests/slurm/up.sh."""

    nodes = ["n1", "n2"]
    partition = "debug"
    up_output = ""   # what up.sh printed (timings, sinfo)
    conf = "/etc/slurm/slurm.conf"
    log_dir = LOG_DIR

    # ---------------------------------------------------------------- jobs
    def sbatch(self, script_path, *args, nodes: int = 2, extra=(), timeout: float = 120,
               cwd=None, env=None, wait: str = "poll"):
        """Submit `script_path` (with script arguments `args`) on `nodes` nodes, wait for the
        job to finish and return ``(jobid, returncode)``; jobid is a str.

        `extra` are more sbatch options (they come last, so they override ours). The job
        runs in `cwd` (default: the script's directory), so its default output file
        slurm-<jobid>.out lands there. The job gets a Slurm time limit derived from
        `timeout`; if it is not finished after `timeout` s it is cancelled and the test fails
        with the cluster's state and log tails.

        returncode is the job's exit status like ``sbatch --wait`` gives it, except that a
        job killed by a signal gives -signal, and a job that ended without running to
        completion (cancelled, timed out, node failure) never gives 0.

        ``wait="poll"`` (default) submits with ``sbatch --parsable`` and polls
        ``scontrol show job`` every 0.1-0.25 s. ``wait="sbatch"`` uses ``sbatch --wait
        --parsable`` instead, which is slower: sbatch polls after 2, 10, 42, 74... s, so a
        2.5 s job takes 10 s."""
        script_path = os.fspath(script_path)
        cwd = os.fspath(cwd) if cwd is not None else os.path.dirname(os.path.abspath(script_path))
        name = "vinehpc-test-%s" % uuid.uuid4().hex[:10]
        minutes = max(1, int(timeout // 60) + 1)
        argv = ["sbatch", "--parsable", "--job-name", name, "--nodes", str(nodes),
                "--chdir", cwd, "--time", str(minutes), *extra, script_path, *map(str, args)]
        if wait == "sbatch":
            argv.insert(1, "--wait")
        elif wait != "poll":
            raise ValueError("wait must be 'poll' or 'sbatch', got %r" % (wait,))
        deadline = time.monotonic() + timeout
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=timeout if wait == "sbatch" else 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            msg = self.diagnose("timeout: job %s (%s) unfinished after %.0f s; cancelled\n"
                                "sbatch stdout: %s\nsbatch stderr: %s"
                                % (name, " ".join(argv), timeout, out, err))
            _run(["scancel", "--name", name])
            pytest.fail(msg, pytrace=False)
        jobid = out.strip().splitlines()[0].split(";")[0] if out.strip() else ""
        if not jobid:
            pytest.fail("sbatch rejected the job (rc %s): %s\n%s" % (proc.returncode, " ".join(argv), err),
                        pytrace=False)
        if wait == "sbatch":
            return jobid, proc.returncode

        interval = 0.1
        while True:
            info = self.job_info(jobid)
            state = (info or {}).get("JobState")
            if state in FINISHED_STATES:
                return jobid, self._returncode(info)
            if info is None:
                pytest.fail(self.diagnose("job %s vanished from slurmctld before finishing" % jobid),
                            pytrace=False)
            if time.monotonic() > deadline:
                msg = self.diagnose("timeout: job %s still %s after %.0f s; cancelled\n%s"
                                    % (jobid, state, timeout, self.show_job(jobid)))
                _run(["scancel", jobid])
                pytest.fail(msg, pytrace=False)
            time.sleep(interval)
            interval = min(0.25, interval * 1.2)

    @staticmethod
    def _returncode(info: dict) -> int:
        code, _, sig = info.get("ExitCode", "0:0").partition(":")
        rc = -int(sig) if sig.isdigit() and int(sig) else int(code or 0)
        if rc == 0 and info.get("JobState") != "COMPLETED":
            rc = 1
        return rc

    def show_job(self, jobid) -> str:
        """`scontrol show job` output (empty once slurmctld forgot the job)."""
        r = _run(["scontrol", "show", "job", str(jobid)])
        return r.stdout if r.returncode == 0 else ""

    def job_info(self, jobid):
        """The job's `scontrol show job -o` record as a dict, or None if slurmctld does not
        know it (finished jobs stay visible for MinJobAge=300 s; there is no accounting)."""
        r = _run(["scontrol", "-o", "show", "job", str(jobid)])
        if r.returncode != 0 or not r.stdout.strip():
            if "Invalid job id" in r.stdout:
                return None
            raise RuntimeError("scontrol show job %s failed (rc %d): %s" % (jobid, r.returncode, r.stdout))
        return _parse_kv(r.stdout.strip().splitlines()[0])

    def job_state(self, jobid):
        """The job's JobState ('PENDING', 'RUNNING', 'COMPLETED', 'FAILED', ...), or None
        if slurmctld does not know the job."""
        info = self.job_info(jobid)
        return None if info is None else info.get("JobState")

    # ---------------------------------------------------------------- diagnostics
    def diagnose(self, what: str = "") -> str:
        """`what`, then sinfo, squeue and the tails of the daemons' logs."""
        parts = [what] if what else []
        for argv in (["sinfo", "-N", "-l"], ["squeue", "-l"]):
            try:
                parts.append("$ %s\n%s" % (" ".join(argv), _run(argv, timeout=15).stdout))
            except Exception as e:  # diagnostics only
                parts.append("$ %s: %r" % (" ".join(argv), e))
        for name in ["slurmctld.log"] + ["slurmd-%s.log" % n for n in self.nodes]:
            path = os.path.join(self.log_dir, name)
            parts.append("--- last lines of %s ---\n%s" % (path, _tail(path)))
        return "\n".join(parts)


def _bring_up() -> str:
    require(sys.platform.startswith("linux"), "the Slurm testbed needs Linux")
    require(os.geteuid() == 0, "the Slurm testbed needs root (starts slurmctld/slurmd, may apt-get install)")
    require(shutil.which("bash") is not None, "the Slurm testbed needs bash")
    t0 = time.monotonic()
    try:
        r = _run(["bash", UP_SH], timeout=UP_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        pytest.fail("tests/slurm/up.sh did not finish in %d s:\n%s" % (UP_TIMEOUT, e.output or ""),
                    pytrace=False)
    if r.returncode == 2:
        require(False, "tests/slurm/up.sh cannot run here:\n%s" % r.stdout)
    if r.returncode != 0:
        pytest.fail("tests/slurm/up.sh failed (rc %d) after %.1f s:\n%s"
                    % (r.returncode, time.monotonic() - t0, r.stdout), pytrace=False)
    return "tests/slurm/up.sh took %.1f s:\n%s" % (time.monotonic() - t0, r.stdout)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running two-node Slurm cluster (n1, n2) on this host; see SlurmCluster.

    Torn down at the end of the session unless VINEHPC_SLURM_KEEP=1, or when running in a
    pytest-xdist worker (the workers share the one cluster; up.sh serializes them)."""
    cluster = SlurmCluster()
    cluster.up_output = _bring_up()
    try:
        yield cluster
    finally:
        if os.environ.get("VINEHPC_SLURM_KEEP", "") != "1" and not os.environ.get("PYTEST_XDIST_WORKER"):
            try:
                _run(["bash", DOWN_SH], timeout=60)
            except subprocess.TimeoutExpired:
                pass


# -------------------------------------------------------------------- MPI
def _mpich_mpiexec():
    """Path of the mpiexec that the `mpich` wheel installed, or None."""
    try:
        from importlib import metadata
        dist = metadata.distribution("mpich")
    except Exception:
        return None
    for f in dist.files or ():
        if f.name == "mpiexec":
            p = os.path.normpath(os.path.abspath(str(f.locate())))
            if os.access(p, os.X_OK):
                return p
    for d in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        p = os.path.join(d, "mpiexec")
        if d and os.access(p, os.X_OK):
            return p
    return None


def _have_mpi4py() -> bool:
    import importlib.util
    importlib.invalidate_caches()
    return importlib.util.find_spec("mpi4py") is not None


@pytest.fixture(scope="session")
def mpi():
    """Path of MPICH's mpiexec (from the `mpich` wheel); mpi4py is importable by
    sys.executable. Both are pip-installed into this interpreter if missing."""
    mpiexec = _mpich_mpiexec()
    if mpiexec is None or not _have_mpi4py():
        env = dict(os.environ, PIP_BREAK_SYSTEM_PACKAGES="1", PIP_ROOT_USER_ACTION="ignore",
                   PIP_DISABLE_PIP_VERSION_CHECK="1")
        argv = [sys.executable, "-m", "pip", "install", "-q", "mpi4py", "mpich"]
        try:
            r = _run(argv, timeout=PIP_TIMEOUT, env=env)
        except subprocess.TimeoutExpired as e:
            require(False, "%s did not finish in %d s:\n%s" % (" ".join(argv), PIP_TIMEOUT, e.output or ""))
        else:
            require(r.returncode == 0, "%s failed (rc %d):\n%s" % (" ".join(argv), r.returncode, r.stdout))
        mpiexec = _mpich_mpiexec()
    require(mpiexec is not None, "the mpich wheel is installed but has no mpiexec")
    require(_have_mpi4py(), "mpi4py is not importable after pip install")
    return mpiexec
