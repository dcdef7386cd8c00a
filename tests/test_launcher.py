"""Unit tests of the pilot's pure parts (no MPI, no Slurm): vinehpc.config.Slurm reads the
allocation from an environment mapping and launcher/slurm.py sizes ranks from it,
launcher.pilot.plan_workers lays workers out over the ranks, and the contact file
(launcher/contact.py) carries the run's secret (0600 only)."""
from __future__ import annotations

import ipaddress
import json
import os
import socket
import stat
import subprocess
import sys

import pytest

from launcher import contact as contact_file, pilot, slurm
from vinehpc.config import Settings, Slurm

AFFINITY = len(os.sched_getaffinity(0))


# ------------------------------------------------------------------ cpus_for_rank
@pytest.mark.parametrize("env, ranks, want", [
    ({"SLURM_CPUS_PER_TASK": "4"}, 1, 4),
    ({"SLURM_CPUS_PER_TASK": "4"}, 3, 4),                       # --cpus-per-task is already per rank
    ({"SLURM_CPUS_PER_TASK": "2", "SLURM_CPUS_ON_NODE": "16"}, 1, 2),
    ({"SLURM_CPUS_ON_NODE": "8"}, 1, 8),
    ({"SLURM_CPUS_ON_NODE": "8"}, 2, 4),                        # the node's CPUs shared by its ranks
    ({"SLURM_CPUS_ON_NODE": "8"}, 3, 2),
    ({"SLURM_CPUS_ON_NODE": "2"}, 4, 1),                        # never less than one
    ({"SLURM_JOB_CPUS_PER_NODE": "2(x3)"}, 1, 2),
    ({"SLURM_JOB_CPUS_PER_NODE": "6(x2),4"}, 2, 3),
    ({"SLURM_JOB_CPUS_PER_NODE": "12"}, 4, 3),
    ({"SLURM_CPUS_ON_NODE": "4", "SLURM_JOB_CPUS_PER_NODE": "8(x2)"}, 1, 4),   # this node first
    ({"SLURM_CPUS_PER_TASK": "", "SLURM_CPUS_ON_NODE": "6"}, 2, 3),            # empty = unset
])
def test_cpus_for_rank(env, ranks, want):
    assert slurm.cpus_for_rank(Slurm.from_env(env), ranks_on_node=ranks) == want


@pytest.mark.parametrize("env", [{}, {"SLURM_CPUS_ON_NODE": "lots"}, {"SLURM_CPUS_PER_TASK": "0"}])
def test_cpus_for_rank_outside_an_allocation_uses_the_affinity(env):
    assert slurm.cpus_for_rank(Slurm.from_env(env)) == AFFINITY
    assert slurm.cpus_for_rank(Slurm.from_env(env), ranks_on_node=AFFINITY * 4) == 1


# ------------------------------------------------------------------ memory_for_rank
@pytest.mark.parametrize("env, ranks, cpus, want", [
    ({"SLURM_MEM_PER_CPU": "500"}, 1, 1, 500),
    ({"SLURM_MEM_PER_CPU": "500"}, 2, 3, 1500),                 # x the rank's cpus
    ({"SLURM_MEM_PER_NODE": "8000"}, 1, 2, 8000),
    ({"SLURM_MEM_PER_NODE": "8000"}, 4, 2, 2000),               # shared by the node's ranks
    ({"SLURM_MEM_PER_NODE": "8000", "SLURM_MEM_PER_CPU": "100"}, 1, 2, 200),
    ({}, 1, 4, None),                                           # not from the allocation: the worker detects it
    ({"SLURM_MEM_PER_NODE": "0"}, 1, 1, None),
])
def test_memory_for_rank(env, ranks, cpus, want):
    assert slurm.memory_for_rank(Slurm.from_env(env), ranks_on_node=ranks, cpus=cpus) == want


def test_node_name_and_job_label():
    assert Slurm.from_env({"SLURMD_NODENAME": "n2"}).node_name == "n2"
    assert Slurm.from_env({}).node_name is None and Slurm.from_env({"SLURMD_NODENAME": ""}).node_name is None
    assert Slurm.from_env({"SLURM_JOB_ID": "17"}).job_id == "17" and Slurm.from_env({}).job_id is None
    assert slurm.job_label(Slurm.from_env({"SLURM_JOB_ID": "17", "SLURM_JOB_NAME": "vinehpc"})) == "job 17 (vinehpc)"
    assert slurm.job_label(Slurm.from_env({})) == "no Slurm job"


# ------------------------------------------------------------------ plan_workers
def layout(nodes, **kw):
    """[(workers, ranks_on_node)] for every rank."""
    return [pilot.plan_workers(r, nodes, **kw) for r in range(len(nodes))]


def test_plan_one_rank_per_node():
    # sbatch -N 2 --ntasks-per-node=1: rank 0 is the manager, rank 1 one worker
    assert layout(["n1", "n2"]) == [(0, 1), (1, 1)]
    assert layout(["n1", "n2"], manager_node_works=True) == [(1, 1), (1, 1)]
    assert layout(["n1", "n2", "n3"]) == [(0, 1), (1, 1), (1, 1)]


def test_plan_several_ranks_per_node():
    nodes = ["a", "a", "b", "b"]
    assert layout(nodes) == [(0, 2), (1, 2), (1, 2), (1, 2)]                # one worker per rank but 0
    assert layout(nodes, manager_node_works=True) == [(1, 2), (1, 2), (1, 2), (1, 2)]
    # N per node, all on the lowest worker rank of the node
    assert layout(nodes, workers_per_node=3) == [(0, 2), (3, 2), (3, 2), (0, 2)]
    assert layout(nodes, workers_per_node=2, manager_node_works=True) == [(2, 2), (0, 2), (2, 2), (0, 2)]


def test_plan_ranks_in_any_order():
    # srun --distribution=cyclic: the ranks of a node are not contiguous
    nodes = ["a", "b", "a", "b"]
    assert layout(nodes) == [(0, 2), (1, 2), (1, 2), (1, 2)]
    assert layout(nodes, workers_per_node=2) == [(0, 2), (2, 2), (2, 2), (0, 2)]


def test_plan_workers_per_node_totals():
    nodes = ["n%d" % (i // 4) for i in range(12)]         # 3 nodes x 4 ranks
    for wpn in (1, 2, 5):
        # the manager's node has worker ranks too (1-3): its workers go on rank 1, or on rank 0
        # when it works
        plan = layout(nodes, workers_per_node=wpn)
        assert sum(n for n, _ in plan) == 3 * wpn and [r for r, (n, _) in enumerate(plan) if n] == [1, 4, 8]
        plan = layout(nodes, workers_per_node=wpn, manager_node_works=True)
        assert sum(n for n, _ in plan) == 3 * wpn and [r for r, (n, _) in enumerate(plan) if n] == [0, 4, 8]
    assert sum(n for n, _ in layout(nodes)) == 11
    assert sum(n for n, _ in layout(nodes, manager_node_works=True)) == 12


def test_plan_single_rank():
    assert pilot.plan_workers(0, ["a"]) == (0, 1)           # main() turns manager_node_works on for size 1
    assert pilot.plan_workers(0, ["a"], manager_node_works=True) == (1, 1)
    assert pilot.plan_workers(0, ["a"], workers_per_node=2, manager_node_works=True) == (2, 1)


# ------------------------------------------------------------------ contact file
def test_contact_file_round_trip_is_0600(tmp_path):
    path = contact_file.write_contact(str(tmp_path), "10.0.0.5:9123", "s3cret", job_id="42")
    assert path == str(tmp_path / "contact.json")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert contact_file.read_contact(path) == ("10.0.0.5:9123", "s3cret")
    with open(path) as f:
        d = json.load(f)
    assert d["job"] == "42" and d["pid"] == os.getpid()
    assert not os.path.exists(path + ".tmp")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_read_contact_refuses_a_file_others_can_read(tmp_path, mode):
    path = contact_file.write_contact(str(tmp_path), "10.0.0.5:9123", "s3cret")
    os.chmod(path, mode)
    with pytest.raises(PermissionError, match=r"readable by others \(mode %o\): chmod 600" % mode):
        contact_file.read_contact(path)


def test_worker_cli_refuses_a_readable_contact_file(tmp_path):
    path = contact_file.write_contact(str(tmp_path), "127.0.0.1:1", "s3cret")
    os.chmod(path, 0o644)
    r = subprocess.run([sys.executable, "-m", "vinehpc", "worker", "--contact", path, "--connect-timeout", "1"],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=30)
    assert r.returncode == 2, r.stdout
    assert "cannot read the contact file" in r.stdout and "chmod 600" in r.stdout, r.stdout


def test_contact_file_is_0600_even_over_a_leftover_tmp_file(tmp_path):
    leftover = tmp_path / "contact.json.tmp"
    leftover.write_text("")
    os.chmod(leftover, 0o644)
    path = contact_file.write_contact(str(tmp_path), "10.0.0.5:9123", "s3cret")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


# ------------------------------------------------------------------ contact_host
def test_contact_host_override():
    assert pilot.contact_host(Settings.from_env({"VINEHPC_MANAGER_HOST": "10.1.2.3"})) == "10.1.2.3"


def test_contact_host_is_never_loopback(monkeypatch):
    monkeypatch.setattr(socket, "gethostname", lambda: "node7")
    monkeypatch.setattr(socket, "gethostbyname", lambda name: "127.0.1.1")
    host = pilot.contact_host(Settings.from_env({}))
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host in ("localhost",)
    assert not loopback, "the pilot would broadcast %r as the manager's address" % host
