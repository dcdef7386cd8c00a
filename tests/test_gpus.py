"""GPUs: counted from CUDA_VISIBLE_DEVICES or `nvidia-smi -L`, packed by count, and each task sees
only the devices it holds (CUDA_VISIBLE_DEVICES set per task). No GPU here: a stand-in
`nvidia-smi` executable plays the driver's tool, and the devices are ids a real worker hands out."""
from __future__ import annotations

import os
import stat

import pytest

import vinehpc
from vinehpc.worker import resources

from conftest import wait_all
from test_e2e import spawned, start_worker  # noqa: F401 (fixture)


@pytest.mark.parametrize("value, ids", [
    ("0,2", ["0", "2"]), ("", []), ("NoDevFiles", []), ("1,-1,2", ["1"]), (" 3 , 4", ["3", "4"]),
    ("GPU-8d5c,MIG-GPU-8d5c/1/0", ["GPU-8d5c", "MIG-GPU-8d5c/1/0"]),
])
def test_cuda_visible_devices_is_read_as_cuda_reads_it(monkeypatch, value, ids):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    assert resources.gpu_ids() == ids
    assert resources.detect("/", cores=1, memory=1, disk=1)["gpus"] == len(ids)


def _fake_nvidia_smi(tmp_path, text, rc=0):
    d = tmp_path / "bin"
    d.mkdir()
    exe = d / "nvidia-smi"
    exe.write_text("#!/bin/sh\n[ \"$1\" = -L ] || exit 2\ncat <<'EOF'\n%sEOF\nexit %d\n" % (text, rc))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return str(d)


def test_nvidia_smi_lists_the_gpus_when_cuda_visible_devices_is_unset(monkeypatch, tmp_path):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    out = ("GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-aaaa)\n"
           "  MIG 1g.5gb     Device  0: (UUID: MIG-bbbb)\n"
           "GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-cccc)\n")
    monkeypatch.setenv("PATH", _fake_nvidia_smi(tmp_path, out) + os.pathsep + os.environ["PATH"])
    assert resources.gpu_ids() == ["0", "1"]


def test_a_failing_nvidia_smi_means_no_gpus(monkeypatch, tmp_path):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", _fake_nvidia_smi(tmp_path, "NVIDIA-SMI has failed\n", rc=9) + os.pathsep
                       + os.environ["PATH"])
    assert resources.gpu_ids() == []


@pytest.mark.timeout(120)
def test_each_task_sees_only_the_gpus_it_holds(make_manager, spawned, tmp_path):  # noqa: F811
    """A worker with devices 3 and 5 and 4 cores: 1-GPU tasks run two at a time, each on its own
    device (a task that finds its device's lock taken fails), and a 2-GPU task sees both."""
    m = make_manager(port=0)
    start_worker(spawned, m, "--cores", "4", env=dict(os.environ, CUDA_VISIBLE_DEVICES="3,5"))
    m.wait_for_workers(1, timeout=30)
    locks = tmp_path / "locks"
    locks.mkdir()
    one = ("d=$CUDA_VISIBLE_DEVICES; mkdir %s/$d || exit 3; sleep 0.3; rmdir %s/$d; echo $d" % (locks, locks))
    tasks = [vinehpc.Task(one).set_gpus(1) for _ in range(6)]
    both = vinehpc.Task("echo $CUDA_VISIBLE_DEVICES").set_gpus(2)
    none = vinehpc.Task("echo \"[$CUDA_VISIBLE_DEVICES]\"")
    devices = lambda: __import__("os").environ.get("CUDA_VISIBLE_DEVICES")   # noqa: E731 (by value)
    py = [vinehpc.PythonTask(devices).set_gpus(1) for _ in range(3)]
    py_none = vinehpc.PythonTask(devices)
    for t in tasks + [both, none] + py + [py_none]:
        m.submit(t)
    got = wait_all(m, 12, timeout=90)
    for t in tasks:
        assert got[t.id].successful(), (got[t.id].result, got[t.id].exit_code, got[t.id].std_output)
    seen = [got[t.id].std_output.strip() for t in tasks]
    assert set(seen) == {"3", "5"}, seen
    assert sorted(got[both.id].std_output.strip().split(",")) == ["3", "5"]
    assert got[none.id].std_output.strip() == "[]"           # asked for none: sees none
    assert {got[t.id].output for t in py} <= {"3", "5"}       # a Python task's interpreter sees its own
    assert got[py_none.id].output == ""
