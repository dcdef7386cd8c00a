"""vinehpc.DaskVine: Dask graphs run as tasks, values kept on workers between them.

Real manager, real local workers, real dask collections; results compared with dask's own
schedulers.  Every wait has a deadline (get() runs under a test timeout; polls fail with the
manager's journal).
"""
from __future__ import annotations

import operator
import os
import signal
import subprocess
import sys
import threading

import cloudpickle
import pytest

dask = pytest.importorskip("dask")
np = pytest.importorskip("numpy")
import dask.array as da    # noqa: E402
import dask.bag as db      # noqa: E402
from dask import delayed   # noqa: E402

import vinehpc            # noqa: E402
from vinehpc import RemoteTraceback, TaskError   # noqa: E402

from conftest import close_and_check, diagnose, poll, read_journal   # noqa: E402

# Workers cannot import this test module: its functions travel by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANAGER_PID = os.getpid()


@pytest.fixture(scope="module")
def m(tmp_path_factory):
    """One DaskVine with one local worker of 2 cores: every temp stays on that worker."""
    m = vinehpc.DaskVine(local_workers=1, cores_per_worker=2, run_dir=str(tmp_path_factory.mktemp("dask") / "run"))
    try:
        m.wait_for_workers(1, timeout=30)
    except TimeoutError as e:
        pytest.fail(diagnose(m, str(e)), pytrace=False)
    yield m
    close_and_check(m)


def inc(x):
    return x + 1


def boom(x):
    raise ValueError("boom on %r" % (x,))


# ---------------------------------------------------------------- import
def test_vinehpc_imports_without_dask():
    code = ("import sys; sys.modules['dask'] = None\n"
            "import vinehpc; from vinehpc import DaskVine\n"
            "assert sys.modules['dask'] is None and DaskVine.__name__ == 'DaskVine'\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=REPO))
    assert r.returncode == 0, r.stderr


def test_the_worker_side_runs_without_vinehpc(tmp_path):
    """A task may run in an environment image that has cloudpickle and dask but not vinehpc."""
    from vinehpc.dask_vine import _run_key
    from dask._task_spec import Task, TaskRef
    blob = cloudpickle.dumps((_run_key, cloudpickle.dumps(Task("y", operator.add, TaskRef("x"), 1)),
                              [("x", "in-0")], True, True))
    (tmp_path / "in-0").write_bytes(cloudpickle.dumps((True, 41)))
    (tmp_path / "call.pkl").write_bytes(blob)
    code = ("import sys, pickle; sys.modules['vinehpc'] = None\n"
            "fn, *args = pickle.load(open('call.pkl', 'rb'))\n"
            "assert pickle.loads(fn(*args)) == (True, 42) and pickle.load(open('out', 'rb')) == (True, 42)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------- delayed graphs
@pytest.mark.timeout(120)
def test_diamond_and_an_intermediate_key_requested(m):
    a = delayed(inc)(1)
    b, c = delayed(inc)(a), delayed(operator.mul)(a, 10)
    d = delayed(operator.add)(b, c)
    assert dask.compute(d, a, scheduler=m.get) == (23, 2)
    assert d.compute(scheduler=m.get) == 23


@pytest.mark.timeout(120)
def test_fan_out_fan_in_into_nested_results(m):
    leaves = [delayed(inc)(i) for i in range(24)]
    parts = [delayed(sum)(leaves[i:i + 6]) for i in range(0, 24, 6)]
    total = delayed(sum)(parts)
    got = dask.compute({"total": total, "parts": parts, "plain": 7}, scheduler=m.get)[0]
    want = dask.compute({"total": total, "parts": parts, "plain": 7}, scheduler="sync")[0]
    assert got == want == {"total": sum(range(1, 25)), "parts": [sum(range(i + 1, i + 7)) for i in range(0, 24, 6)],
                           "plain": 7}


@pytest.mark.timeout(120)
def test_legacy_dict_graph_single_and_nested_keys(m):
    dsk = {"x": 1, "y": (inc, "x"), "z": (operator.add, "y", "x"), "unused": (boom, "x")}
    assert m.get(dsk, "z") == 3
    assert m.get(dsk, [["z"], "y"]) == ((3,), 2)        # nested as from dask.threaded.get
    with pytest.raises(KeyError):
        m.get(dsk, "nope")


@pytest.mark.timeout(180)
def test_a_graph_of_a_thousand_tasks(m):
    level = [delayed(inc)(i) for i in range(1000)]
    while len(level) > 1:
        level = [delayed(sum)(level[i:i + 10]) for i in range(0, len(level), 10)]
    assert dask.compute(level[0], scheduler=m.get) == (sum(range(1, 1001)),)
    assert m.get({"x": 1}, []) == ()


@pytest.mark.timeout(120)
def test_a_raising_key_raises_from_get_with_the_remote_traceback(m):
    a = delayed(inc)(1)
    bad = delayed(boom)(a)
    after = delayed(inc)(bad)            # never runs the function: the error passes through
    others = [delayed(inc)(i) for i in range(10)]
    with pytest.raises(ValueError, match="boom on 2") as ei:
        dask.compute(after, others, scheduler=m.get)
    cause = ei.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "dask key 'boom-" in str(cause) and "in boom" in str(cause) and "Traceback" in str(cause)
    # the manager is still good for the next graph
    assert dask.compute(delayed(inc)(41), scheduler=m.get) == (42,)


def die(_):
    os._exit(3)


@pytest.mark.timeout(120)
def test_a_task_that_cannot_finish_is_a_task_error_after_its_retries(m):
    dead = delayed(die)(delayed(inc)(1))
    with pytest.raises(TaskError, match=r"dask key 'die-.*failed") as ei:
        dask.compute(delayed(inc)(dead), scheduler=m.get, retries=2)
    assert "interpreter" in str(ei.value) or "exit" in str(ei.value)
    tid = int(str(ei.value).split("task ")[1].split()[0])
    assert len([r for r in read_journal(m, "retry") if r.get("task") == tid]) == 1     # 2 attempts in all


@pytest.mark.timeout(120)
def test_unpicklable_value_is_the_keys_failure(m):
    import threading as th
    lock = delayed(th.Lock)()
    with pytest.raises(TypeError, match="cannot be pickled"):
        dask.compute(delayed(lambda x: x)(lock), scheduler=m.get)


# ---------------------------------------------------------------- collections
@pytest.mark.timeout(180)
def test_array_matches_the_threaded_scheduler(m):
    x = da.random.RandomState(42).random_sample((600, 600), chunks=(100, 100))
    y = (x + x.T).sum()
    z = (x @ x.T)[::7, 3:50]
    got_y, got_z = dask.compute(y, z, scheduler=m.get)
    want_y, want_z = dask.compute(y, z, scheduler="threads")
    assert np.isclose(got_y, want_y)
    np.testing.assert_allclose(got_z, want_z)


@pytest.mark.timeout(120)
def test_bag_matches_the_sync_scheduler(m):
    b = db.from_sequence(range(200), npartitions=8).map(lambda v: v * 3).filter(lambda v: v % 2 == 0)
    assert b.sum().compute(scheduler=m.get) == b.sum().compute(scheduler="sync")
    assert sorted(b.compute(scheduler=m.get)) == sorted(b.compute(scheduler="sync"))


# ---------------------------------------------------------------- where the values travel
class Chunk:
    """A value that must never be unpickled on the manager (it raises there)."""

    def __init__(self, data):
        self.data = data

    def __reduce__(self):
        return (_rebuild_chunk, (self.data, MANAGER_PID))


def _rebuild_chunk(data, manager_pid):
    if os.getpid() == manager_pid:
        raise AssertionError("an intermediate value was unpickled on the manager")
    return Chunk(data)


def make_chunk(i):
    return Chunk(np.full(256 * 1024, i, dtype=np.float64))       # 2 MiB


def chunk_total(*chunks):
    return float(sum(c.data.sum() for c in chunks))


@pytest.mark.timeout(180)
def test_intermediate_values_stay_on_the_worker(m):
    before = len(read_journal(m))
    chunks = [delayed(make_chunk)(i) for i in range(8)]
    pairs = [delayed(chunk_total)(chunks[i], chunks[i + 1]) for i in range(0, 8, 2)]
    assert dask.compute(delayed(sum)(pairs), scheduler=m.get) == (256 * 1024 * sum(range(8)),)
    recs = read_journal(m)[before:]
    assert [r for r in recs if r.get("event") == "submitted"], "the graph's tasks are not in the journal"
    # one worker: no temp went to the manager or came from it (every input was a temp already there)
    assert not [r for r in recs if r.get("event") == "fetch temp"]
    assert not [r for r in recs if r.get("event") == "put" and str(r.get("file", "")).startswith("temp-")]
    staging = os.path.join(m.run_dir, "staging")
    assert not [n for n in os.listdir(staging) if n.startswith("temp-")]


@pytest.mark.timeout(120)
def test_values_through_the_manager_when_worker_transfers_is_false(m):
    chunks = [delayed(make_chunk)(i) for i in range(2)]
    total = delayed(chunk_total)(*chunks)
    # the values come back as files to the manager (never unpickled there) and go out again
    assert dask.compute(total, scheduler=m.get, worker_transfers=False) == (256 * 1024.0,)
    assert dask.compute(total, scheduler=m.get, checkpoint_fn=lambda graph, key: True) == (256 * 1024.0,)
    assert not os.listdir(os.path.join(m.run_dir, "dask"))      # each get's files are removed after it


# ---------------------------------------------------------------- TaskVine's options
@pytest.mark.timeout(120)
def test_taskvine_options_are_accepted(m, capsys):
    leaves = [delayed(inc)(i) for i in range(12)]
    total = delayed(sum)(leaves)
    got = dask.compute(total, scheduler=m.get, resources={"cores": 1, "memory": 200}, resources_mode="max",
                       lazy_transfers=True, retries=2, max_pending=3, verbose=True, task_mode="function-calls",
                       env_vars={"DASKVINE_X": "1", "DASKVINE_Y": lambda mgr, t: t.category},
                       extra_files={m.declare_buffer(b"hello"): "hello.txt"},
                       low_memory_mode=False, progress_disable=True, progress_label="x", prune_files=False,
                       lib_resources={"cores": 2}, submit_per_cycle=4)
    assert got == (sum(range(1, 13)),)
    assert "dask key" in capsys.readouterr().out       # verbose
    with pytest.raises(TypeError, match="unexpected keyword argument 'nonsense'"):
        dask.compute(total, scheduler=m.get, nonsense=1)
    # newer TaskVine's: a per-task worker scheduler (ours places every task), a command prefix (none here)
    assert dask.compute(total, scheduler=m.get, worker_scheduler="max-available-disk", init_command=None) == (78,)
    with pytest.raises(NotImplementedError, match="environment image"):
        dask.compute(total, scheduler=m.get, init_command="source env.sh")
    assert m.category_name(("sum-partial-0123abcd", 3)) == "sum-partial" and m.category_name(total.key) == "sum"
    infos = []      # TaskVine's wrapper(key, fn, *args) -> (info, value); wrapper_proc(info) on the manager
    assert dask.compute(total, scheduler=m.get, wrapper=lambda key, fn, *a: (key, fn(*a)),
                        wrapper_proc=infos.append) == (sum(range(1, 13)),)
    assert len(infos) == 13 and total.key in infos
    with pytest.raises(ValueError, match="resources"):
        dask.compute(total, scheduler=m.get, resources={"cpus": 1})


def read_env(name, _):
    return os.environ.get(name)


def read_file(name, _):
    with open(name) as f:
        return f.read()


@pytest.mark.timeout(120)
def test_env_vars_and_extra_files_reach_the_task(m):
    dep = delayed(inc)(0)
    got = dask.compute(delayed(read_env)("DASKVINE_X", dep), delayed(read_file)("hello.txt", dep),
                       scheduler=m.get, env_vars={"DASKVINE_X": "yes"},
                       extra_files={m.declare_buffer(b"hello"): "hello.txt"})
    assert got == ("yes", "hello")


# ---------------------------------------------------------------- a lost worker
def wait_for(path, _dep):
    import time
    deadline = time.monotonic() + 60
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError("%s never appeared" % path)
        time.sleep(0.02)
    return 1


@pytest.mark.timeout(180)
def test_a_temp_lost_with_its_worker_is_made_again(tmp_path):
    m = vinehpc.DaskVine(local_workers=2, run_dir=str(tmp_path / "lost"))
    try:
        m.wait_for_workers(2, timeout=30)
        go = tmp_path / "go"
        a = delayed(inc)(1, dask_key_name="producer")
        gate = delayed(wait_for)(str(go), 0, dask_key_name="gate")
        out = {}
        th = threading.Thread(target=lambda: out.update(r=dask.compute(delayed(operator.add)(a, gate),
                                                                         scheduler=m.get)), daemon=True)
        th.start()
        done = poll(lambda: [r for r in read_journal(m, "done") if r.get("category") == "producer"], 60,
                    "the producer to finish", m=m)
        pids = {r["worker"]: r["pid"] for r in read_journal(m, "worker joined")}
        os.kill(pids[done[0]["worker"]], signal.SIGKILL)       # the worker holding the producer's temp
        poll(lambda: read_journal(m, "worker lost"), 30, "the worker to be lost", m=m)
        go.touch()
        th.join(90)
        assert not th.is_alive(), diagnose(m, "get() did not return after the worker was lost")
        assert out["r"] == (3,)
        assert read_journal(m, "recreate"), "the producer of the lost temp was not run again"
    finally:
        m.close()
