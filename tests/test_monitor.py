"""Worker-side resource monitoring and memory/disk limits, with real processes (no mocks)."""
from __future__ import annotations

import os
import sys
import time

import cloudpickle
import pytest

from vinehpc import PythonTask, Task
from vinehpc.worker import monitor
from vinehpc.worker.state import exhausted_reason

from conftest import wait_all

cloudpickle.register_pickle_by_value(sys.modules[__name__])

PY = sys.executable
KEYS = {"memory", "cores", "wall", "disk", "read", "written", "procs"}


def _run(m, tasks, timeout=60):
    ids = {m.submit(t): t for t in tasks}
    got = wait_all(m, len(ids), timeout)
    return [got[i] for i in ids]


@pytest.fixture
def m(make_manager):
    m = make_manager(local_workers=1)
    m.wait_for_workers(1, timeout=30)
    return m


def alloc(mb, secs):
    b = bytearray(mb << 20)
    time.sleep(secs)
    return len(b)


# ------------------------------------------------------------------ measurement
@pytest.mark.timeout(90)
def test_measures_memory_cores_disk_io(m):
    mem = Task('%s -c "b = bytearray(200<<20); import time; time.sleep(1)"' % PY)
    busy = Task('%s -c "import time; t = time.process_time()\nwhile time.process_time() - t < 1.0: pass"' % PY)
    disk = Task('%s -c "open(\'big\', \'wb\').write(b\'x\' * (30<<20)); import time; time.sleep(0.6)"' % PY)
    kids = Task("sleep 1 & sleep 1 & sleep 1 & wait")
    noop = Task("true")
    mem_t, busy_t, disk_t, kids_t, noop_t = _run(m, [mem, busy, disk, kids, noop])
    for t in (mem_t, busy_t, disk_t, kids_t, noop_t):
        assert t.result == "success", (t.result, t.reason, t.std_output)
        assert set(t.resources_measured) >= KEYS, t.resources_measured
        assert t.resources_measured["procs"] >= 1
    assert mem_t.resources_measured["memory"] >= 150, mem_t.resources_measured
    assert 0.5 <= busy_t.resources_measured["cores"] <= 1.5, busy_t.resources_measured
    assert busy_t.resources_measured["wall"] >= 1.0
    assert disk_t.resources_measured["disk"] >= 25, disk_t.resources_measured
    assert disk_t.resources_measured["written"] >= 25 << 20, disk_t.resources_measured
    assert kids_t.resources_measured["procs"] >= 4, kids_t.resources_measured   # the shell and 3 sleeps
    assert noop_t.resources_measured["disk"] < 1 and noop_t.resources_measured["memory"] < 100


@pytest.mark.timeout(60)
def test_inputs_are_not_counted_as_disk(m, tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(b"y" * (20 << 20))
    t = Task("cat in.bin > /dev/null; sleep 0.5").add_input(m.declare_file(str(big)), "in.bin")
    (t,) = _run(m, [t])
    assert t.result == "success", (t.result, t.reason)
    assert t.resources_measured["disk"] < 1, t.resources_measured
    assert t.resources_measured["read"] >= 20 << 20, t.resources_measured


@pytest.mark.timeout(60)
def test_python_task_memory(m):
    small, big = _run(m, [PythonTask(alloc, 1, 0.0), PythonTask(alloc, 150, 0.0)])
    for t in (small, big):
        assert t.result == "success", (t.result, t.reason)
        assert set(t.resources_measured) >= KEYS, t.resources_measured
    assert big.output == 150 << 20
    assert big.resources_measured["memory"] >= 150, big.resources_measured
    assert small.resources_measured["memory"] < 120, small.resources_measured   # the peak is per task


def fragment_heap():
    """Leave 200 MB freed but resident in glibc's heap: one 30 MB free raises its mmap threshold,
    then 8 x 25 MB blocks come from the heap and are freed under a small block kept alive."""
    import sys as _s
    b = bytearray(30 << 20)
    del b
    blocks = [bytearray(25 << 20) for _ in range(8)]
    for x in blocks:
        x[::4096] = b"x" * len(x[::4096])          # resident
    _s.modules["__main__"].__dict__.setdefault("_vinehpc_test_keep", []).append(bytearray(4096))
    del blocks
    return True


def nothing():
    return True


@pytest.mark.timeout(90)
def test_a_python_task_is_not_charged_what_an_earlier_task_freed(m):
    """One interpreter (1 core) runs a task that leaves freed memory in the heap, then a task that
    allocates nothing: the second is measured at the interpreter's baseline, not + 200 MB."""
    first, second = _run(m, [PythonTask(fragment_heap)])[0], None
    assert first.result == "success", (first.result, first.reason)
    assert first.resources_measured["memory"] >= 200, first.resources_measured
    second = _run(m, [PythonTask(nothing)])[0]
    assert second.result == "success"
    assert second.resources_measured["memory"] < 80, second.resources_measured


# ------------------------------------------------------------------ limits
def capped(m, task, **mb):
    """Put `task` in a category whose max is its allocation: an exhaustion comes back as the
    task's result instead of being retried larger (the manager's categories)."""
    cat = "capped-" + "-".join("%s%d" % kv for kv in sorted(mb.items()))
    m.set_category_max_resources(cat, mb)
    for k, v in mb.items():
        getattr(task, "set_" + k)(v)
    return task.set_category(cat)


@pytest.mark.timeout(60)
def test_memory_limit_kills_the_task(m):
    t = capped(m, Task('%s -c "b = bytearray(400<<20); import time; time.sleep(30)"' % PY), memory=100)
    t0 = time.monotonic()
    (t,) = _run(m, [t])
    assert time.monotonic() - t0 < 10
    assert t.result == "resource exhaustion", (t.result, t.reason)
    assert t.reason.startswith("memory: ") and "MB used > 100 MB allocated" in t.reason, t.reason
    assert t.resources_measured["memory"] > 100


@pytest.mark.timeout(60)
def test_memory_limit_in_a_child_process(m):
    # the shell stays small: the memory is in its grandchild
    t = capped(m, Task('sh -c \'%s -c "b = bytearray(300<<20); import time; time.sleep(30)"\'' % PY), memory=150)
    (t,) = _run(m, [t])
    assert t.result == "resource exhaustion" and t.reason.startswith("memory: "), (t.result, t.reason)


@pytest.mark.timeout(60)
def test_disk_limit(m):
    slow = capped(m, Task('%s -c "open(\'big\', \'wb\').write(b\'x\' * (50<<20)); import time; time.sleep(30)"' % PY),
                  disk=10)
    fast = capped(m, Task("head -c 50000000 /dev/zero > big"), disk=10)      # done before the first sample
    ok = capped(m, Task("head -c 5000000 /dev/zero > small; sleep 0.5"), disk=10)
    slow_t, fast_t, ok_t = _run(m, [slow, fast, ok])
    for t in (slow_t, fast_t):
        assert t.result == "resource exhaustion", (t.result, t.reason)
        assert t.reason.startswith("disk: ") and "MB allocated" in t.reason, t.reason
    assert ok_t.result == "success", (ok_t.result, ok_t.reason)


@pytest.mark.timeout(60)
def test_python_task_memory_limit(m):
    t, after = _run(m, [capped(m, PythonTask(alloc, 300, 30), memory=100), PythonTask(alloc, 1, 0)])
    assert t.result == "resource exhaustion" and t.reason.startswith("memory: "), (t.result, t.reason)
    assert after.result == "success"        # a fresh interpreter runs the next task


@pytest.mark.timeout(90)
def test_exhaustion_is_retried_larger(m):
    """Uncapped, the manager retries an exhausted task with more memory until it fits."""
    t = Task('%s -c "b = bytearray(300<<20); import time; time.sleep(1)"' % PY).set_memory(100)
    (t,) = _run(m, [t])
    assert t.result == "success", (t.result, t.reason)
    assert t.resources_measured["memory"] >= 250


@pytest.mark.timeout(60)
def test_unrequested_resources_are_not_enforced(m):
    (t,) = _run(m, [Task('%s -c "b = bytearray(200<<20); import time; time.sleep(0.6)"' % PY)])
    assert t.result == "success", (t.result, t.reason)


# ------------------------------------------------------------------ unit
def test_disk_usage_ignores_symlinks(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"x" * 1000)
    (tmp_path / "g").write_bytes(b"x" * 24)
    big = tmp_path.parent / ("outside-%d" % os.getpid())
    big.write_bytes(b"y" * 100000)
    try:
        os.symlink(big, tmp_path / "link")
        os.symlink(tmp_path.parent, tmp_path / "dirlink")
        assert monitor.disk_usage(str(tmp_path)) == 1024
    finally:
        big.unlink()


def test_exhausted_reason():
    assert exhausted_reason({"resource": "memory", "used": 2150, "allocated": 1000}) == \
        "memory: 2,150 MB used > 1,000 MB allocated"


def test_unreadable_process_table_is_reported_and_disk_still_enforced(tmp_path, monkeypatch, caplog):
    """Memory enforcement must not stop silently: the failure is logged (once) and the tasks'
    disk is still measured and enforced meanwhile."""
    from vinehpc.worker.events import Exhausted, TaskSpec
    from vinehpc.worker.execution import Execution, Handle
    from vinehpc.worker.state import Run

    def broken():
        raise PermissionError("/proc is not readable")
    monkeypatch.setattr(monitor, "proc_table", broken)
    ex = Execution(None, None, None, None, workdir=str(tmp_path), hostname="h")
    spec = TaskSpec(1, "x", None, res={"cores": 1, "memory": 10, "disk": 1, "gpus": 0})
    box = tmp_path / "box"
    box.mkdir()
    (box / "big").write_bytes(b"x" * (2 << 20))
    h = ex.handles[1] = Handle(spec)
    h.mon = monitor.Monitor(box=str(box))
    h.mon.attach(os.getpid())
    run = Run(spec, None)
    run.started = 0.0
    with caplog.at_level("ERROR", logger="vinehpc.worker"):
        assert ex.sample(1.0, [run]) == [Exhausted(1, {"resource": "disk", "used": 2, "allocated": 1})]
        ex.sample(2.0, [run])
    assert [r.message for r in caplog.records].count(
        "cannot read the process table (/proc is not readable): memory limits are NOT enforced until it can be") == 1
