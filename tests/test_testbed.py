"""The HPC testbed itself: a real two-node Slurm cluster on this host (tests/slurm/up.sh)
and MPICH + mpi4py from PyPI. If these fail, every Slurm/MPI test after them is moot."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

# Registers the fixtures when tests/conftest.py does not (same name: registered once).
# Not imported here directly: a module imported before pytest registers it as a plugin
# gets a PytestAssertRewriteWarning.
pytest_plugins = ["slurm_fixture"]

PY = sys.executable
# One os.write per rank: mpiexec and srun merge the ranks' output, and a print() can be
# split into two writes (text, then newline) that interleave with other ranks' lines.
PROBE = ("import os; from mpi4py import MPI; c = MPI.COMM_WORLD; s = c.allreduce(c.rank); "
         "os.write(1, ('rank=%d size=%d sum=%d node=%s end\\n' % (c.rank, c.size, s, "
         "os.environ.get('SLURMD_NODENAME', '-'))).encode())")
PROBE_RE = re.compile(r"rank=(\d+) size=(\d+) sum=(\d+) node=(\S+?) end")


def job_script(path, body: str):
    # no `#SBATCH` lines: options go on the command line (sbatch stops reading
    # directives at the first command, which is easy to get wrong)
    path.write_text("#!/bin/bash\nset -euo pipefail\n" + textwrap.dedent(body).lstrip())
    return path


def read_lines(path) -> list:
    assert os.path.exists(path), "the job wrote no output file %s" % path
    with open(path) as f:
        return [line.rstrip("\n") for line in f]


def probe_lines(text: str) -> list:
    """The PROBE records in `text` as dicts, sorted by rank."""
    out = [dict(zip(("rank", "size", "sum", "node"), m.groups())) for m in PROBE_RE.finditer(text)]
    return sorted(out, key=lambda d: int(d["rank"]))


@pytest.mark.timeout(300)
def test_two_node_batch_job_runs_steps_on_both_nodes(slurm_cluster, tmp_path):
    assert slurm_cluster.nodes == ["n1", "n2"]
    script = job_script(tmp_path / "job.sh", """
        echo "args=$*"
        echo "batch node=$SLURMD_NODENAME nnodes=$SLURM_JOB_NUM_NODES nodelist=$SLURM_JOB_NODELIST"
        scontrol show hostnames "$SLURM_JOB_NODELIST" | sed 's/^/hostname /'
        srun bash -c 'echo "step node=$SLURMD_NODENAME procid=$SLURM_PROCID nodeid=$SLURM_NODEID"'
        srun -N1 -n1 -w n2 bash -c 'echo "targeted node=$SLURMD_NODENAME"'
    """)
    out = tmp_path / "out.txt"
    jobid, rc = slurm_cluster.sbatch(script, "a b", "c", nodes=2, timeout=120,
                                     extra=["--ntasks-per-node=1", "--output", str(out)])
    lines = read_lines(out)
    assert rc == 0, "job %s rc %d, output:\n%s" % (jobid, rc, "\n".join(lines))
    assert slurm_cluster.job_state(jobid) == "COMPLETED"
    assert "args=a b c" in lines
    assert "batch node=n1 nnodes=2 nodelist=n[1-2]" in lines
    assert [ln for ln in lines if ln.startswith("hostname ")] == ["hostname n1", "hostname n2"]
    assert sorted(ln for ln in lines if ln.startswith("step ")) == [
        "step node=n1 procid=0 nodeid=0", "step node=n2 procid=1 nodeid=1"]
    assert "targeted node=n2" in lines


@pytest.mark.timeout(300)
def test_failing_job_gives_its_exit_code(slurm_cluster, tmp_path):
    script = job_script(tmp_path / "fail.sh", "echo about to fail\nexit 3\n")
    jobid, rc = slurm_cluster.sbatch(script, nodes=1, timeout=60)
    assert rc == 3
    assert slurm_cluster.job_state(jobid) == "FAILED"
    assert read_lines(tmp_path / ("slurm-%s.out" % jobid)) == ["about to fail"]


@pytest.mark.timeout(480)
def test_mpi4py_ranks_under_srun_pmi2(slurm_cluster, mpi, tmp_path):
    # pip's MPICH speaks PMI-2: with --mpi=none each rank would be a singleton (size 1)
    script = job_script(tmp_path / "mpi.sh", """
        srun --mpi=pmi2 -N2 -n3 "$1" -c "$2"
    """)
    out = tmp_path / "out.txt"
    jobid, rc = slurm_cluster.sbatch(script, PY, PROBE, nodes=2, timeout=120,
                                     extra=["--ntasks=3", "--output", str(out)])
    lines = read_lines(out)
    assert rc == 0, "job %s rc %d, output:\n%s" % (jobid, rc, "\n".join(lines))
    ranks = probe_lines("\n".join(lines))
    assert [d["rank"] for d in ranks] == ["0", "1", "2"], lines
    assert all(d["size"] == "3" and d["sum"] == "3" for d in ranks), lines
    assert {d["node"] for d in ranks} == {"n1", "n2"}, lines


@pytest.mark.timeout(480)
def test_mpiexec_without_slurm(mpi):
    # no Slurm variables: hydra must not try to launch through srun
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_", "PMIX_"))}
    r = subprocess.run([mpi, "-n", "3", PY, "-c", PROBE], env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=60)
    assert r.returncode == 0, r.stdout
    ranks = probe_lines(r.stdout)
    assert [d["rank"] for d in ranks] == ["0", "1", "2"], r.stdout
    assert all(d["size"] == "3" and d["sum"] == "3" for d in ranks), r.stdout
