"""vinehpc.Executor beyond CPython's own tests (tests/test_cf_conformance.py): what a remote
executor adds (cancel withdraws the task, pending calls finish after shutdown(wait=False) and
at interpreter exit, workers do not outlive it) and TaskVine's FuturesExecutor features
(futures as arguments, future_task, future_funcall, reduce, allpairs, map, constructor)."""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import cloudpickle
import pytest

import vinehpc
from conftest import assert_no_survivors, poll, process_tree, read_journal

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
cloudpickle.register_pickle_by_value(sys.modules[__name__])    # workers cannot import this module


# ------------------------------------------------------------------ functions the workers run
def wait_for_file(path, timeout=30.0):
    """Hold a worker until the test creates `path` (a gate), then return its name."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError("gate %s never opened" % path)
        time.sleep(0.005)
    return os.path.basename(path)


def touch(path):
    with open(path, "w") as f:
        f.write("ran")
    return path


def add(x, y):
    return x + y


def add3(a, b, c):
    return a + b + c


def mul(x, y):
    return x * y


def fail(msg):
    raise KeyError(msg)


def shout(x):
    print("remote says", x)
    return x


@pytest.fixture(scope="module")
def ex(tmp_path_factory):
    e = vinehpc.Executor(max_workers=2, run_dir=str(tmp_path_factory.mktemp("futures-run")))
    e.manager.wait_for_workers(2, timeout=30)
    tree = process_tree(e.manager._local.pids())
    yield e
    e.shutdown(wait=True)
    assert_no_survivors(tree, timeout=15, what="executor workers after shutdown")


def _block_workers(ex, tmp_path, n=2):
    """n calls that hold the workers until the returned gate file is created."""
    gate = str(tmp_path / "gate")
    busy = [ex.submit(wait_for_file, gate) for _ in range(n)]
    poll(lambda: all(f.running() for f in busy), 20, "the workers to be busy", m=ex.manager)
    return gate, busy


def _open(gate):
    open(gate, "w").close()


# ------------------------------------------------------------------ the concurrent.futures contract
@pytest.mark.timeout(60)
def test_a_cancelled_call_never_runs(ex, tmp_path):
    gate, busy = _block_workers(ex, tmp_path)
    mark = tmp_path / "side-effect"
    pending = ex.submit(touch, str(mark))
    assert not pending.running() and pending.cancel() and pending.cancelled()
    after = ex.submit(touch, str(tmp_path / "after"))     # queued behind it: runs once the workers are free
    _open(gate)
    assert after.result(timeout=30) and [f.result(timeout=30) for f in busy] == ["gate", "gate"]
    assert not mark.exists(), "the cancelled call ran"
    recs = [r for r in read_journal(ex.manager, "failed") if r.get("result") == "cancelled"]
    assert recs and recs[-1]["task"] == pending.tid
    assert pending.tid not in [r["task"] for r in read_journal(ex.manager, "dispatched")]
    assert cf.wait([pending], timeout=5).done == {pending}       # waiters were told


@pytest.mark.timeout(60)
def test_cancel_futures_cancels_queued_calls_and_lets_running_ones_finish(ex, tmp_path):
    own = vinehpc.Executor(manager=ex.manager)          # its calls on the shared workers
    gate, busy = _block_workers(own, tmp_path)
    queued = [own.submit(touch, str(tmp_path / ("q%d" % i))) for i in range(4)]
    own.shutdown(wait=False, cancel_futures=True)
    assert all(f.cancelled() for f in queued)
    assert not any(f.cancelled() or f.done() for f in busy)      # running: neither cancelled nor killed
    _open(gate)
    assert [f.result(timeout=30) for f in busy] == ["gate", "gate"]
    assert not any((tmp_path / ("q%d" % i)).exists() for i in range(4))
    assert not ex.manager.closed                         # a shared Manager stays open


@pytest.mark.timeout(90)
def test_shutdown_without_wait_lets_pending_calls_finish(tmp_path):
    e = vinehpc.Executor(max_workers=1, run_dir=str(tmp_path / "run"))
    gate = str(tmp_path / "gate")
    first = e.submit(wait_for_file, gate)
    rest = [e.submit(touch, str(tmp_path / ("f%d" % i))) for i in range(5)]
    t0 = time.monotonic()
    e.shutdown(wait=False)
    assert time.monotonic() - t0 < 2 and not e.manager.closed
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        e.submit(touch, str(tmp_path / "late"))
    _open(gate)
    assert first.result(timeout=60) == "gate"
    assert [f.result(timeout=30) for f in rest] == [str(tmp_path / ("f%d" % i)) for i in range(5)]
    poll(lambda: e.manager.closed, 30, "the executor's own manager to close once its calls are done")


CHILD = r'''
import atexit, json, sys, time
import vinehpc

def late():
    try:
        ex.submit(abs, -1)
    except RuntimeError as e:
        print("late submit:", e)

def slow(x):
    time.sleep(0.5)
    print("pending call ran", x)
    return x

atexit.register(late)           # registered first, runs last: after the executor's exit hook
ex = vinehpc.Executor(max_workers=1)
ex.manager.wait_for_workers(1, timeout=30)
print(json.dumps(ex.manager._local.pids()))
sys.stdout.flush()
ex.submit(slow, 1)
ex.submit(slow, 2)
# no shutdown: the interpreter exits with two calls pending
'''


@pytest.mark.timeout(90)
def test_interpreter_exit_finishes_pending_calls_and_leaves_no_worker(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, VINEHPC_RUN_DIR=str(tmp_path / "runs"))
    r = subprocess.run([sys.executable, "-c", CHILD], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r
    lines = r.stdout.splitlines()
    pids = json.loads(lines[0])
    assert lines[1:] == ["pending call ran 1", "pending call ran 2",
                         "late submit: cannot schedule new futures after interpreter shutdown"], r.stdout
    assert r.stderr == "", r.stderr                      # no orphaned worker retrying and complaining
    assert_no_survivors(pids, timeout=5, what="workers of an executor after interpreter exit")


@pytest.mark.timeout(90)
def test_under_vinehpc_run_the_scripts_end_lets_pending_calls_finish(tmp_path):
    script = tmp_path / "pending.py"
    script.write_text(textwrap.dedent('''
        import time
        import vinehpc as vine

        def slow(x):
            time.sleep(0.3)
            print("pending call ran", x)

        first = vine.FuturesExecutor()
        assert first.submit(abs, -1).result(timeout=30) == 1
        first.shutdown()
        assert first.manager.closed     # made for it, closed with it (a pilot runs one Manager at a time)
        ex = vine.FuturesExecutor()
        for i in range(3):
            ex.submit(slow, i)
    '''))
    env = dict(os.environ, PYTHONPATH=ROOT, VINEHPC_RUN_DIR=str(tmp_path / "runs"))
    r = subprocess.run([sys.executable, "-m", "vinehpc", "run", "-n", "1", str(script)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r
    assert sorted(r.stdout.splitlines()) == ["pending call ran %d" % i for i in range(3)], r


@pytest.mark.timeout(60)
def test_an_executor_left_at_once_exits_at_once_and_quietly(tmp_path):
    # its worker may still be starting when the manager closes: it must leave, not retry and complain
    env = dict(os.environ, PYTHONPATH=ROOT, VINEHPC_RUN_DIR=str(tmp_path / "runs"))
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", "import vinehpc; ex = vinehpc.Executor(max_workers=1)"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    assert time.monotonic() - t0 < 5


@pytest.mark.timeout(60)
def test_keywords_named_fn_or_self_reach_the_call_and_max_workers_is_checked(ex):
    assert ex.submit(add, x=1, y=2).result(timeout=30) == 3
    assert ex.submit(dict, self=1, fn=2).result(timeout=30) == {"self": 1, "fn": 2}
    with pytest.raises(TypeError):
        ex.submit(fn=add, x=1)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="max_workers must be greater than 0"):
            vinehpc.Executor(max_workers=bad)


@pytest.mark.timeout(60)
def test_what_a_call_prints_reaches_our_stdout_and_exceptions_keep_the_remote_traceback(ex, capfd):
    assert ex.submit(shout, 7).result(timeout=30) == 7
    assert "remote says 7" in capfd.readouterr().out
    with pytest.raises(KeyError, match="nope") as ei:
        ex.submit(fail, "nope").result(timeout=30)
    assert isinstance(ei.value.__cause__, vinehpc.RemoteTraceback)
    assert "in fail" in str(ei.value.__cause__)


# ------------------------------------------------------------------ futures as arguments
@pytest.mark.timeout(60)
def test_futures_as_arguments_are_dependencies_and_submit_does_not_block(ex, tmp_path):
    gate = str(tmp_path / "gate")
    a = ex.submit(wait_for_file, gate)
    t0 = time.monotonic()
    b = ex.submit(add, a, "-b")                 # waits for a, without blocking us
    c = ex.submit(add, x=b, y="-c")             # keyword arguments too, and chains
    assert time.monotonic() - t0 < 1 and not b.running() and not c.running()
    assert b.tid is None                        # not even submitted to the manager yet
    _open(gate)
    assert c.result(timeout=30) == "gate-b-c"
    with cf.ThreadPoolExecutor(1) as pool:      # any concurrent.futures.Future is a dependency
        assert ex.submit(add, pool.submit(str, 4), "2").result(timeout=30) == "42"


@pytest.mark.timeout(60)
def test_a_failed_or_cancelled_dependency_fails_the_dependent_call(ex, tmp_path):
    bad = ex.submit(fail, "dep")
    child = ex.submit(add, bad, 1)
    grandchild = ex.submit(add, 1, y=child)         # a failure travels down a chain
    assert isinstance(grandchild.exception(timeout=30), KeyError)
    assert isinstance(child.exception(timeout=30), KeyError)
    gate = str(tmp_path / "gate")
    a = ex.submit(wait_for_file, gate)
    never = cf.Future()
    waiting = ex.submit(touch, never)           # its dependency never completes...
    assert waiting.cancel() and waiting.cancelled()       # ...so it can be cancelled (and waiters told)
    assert cf.wait([waiting], timeout=5).done == {waiting}
    never.cancel()
    later = ex.submit(add, never, 1)
    assert isinstance(later.exception(timeout=10), cf.CancelledError)
    _open(gate)
    assert a.result(timeout=30) == "gate"


@pytest.mark.timeout(60)
def test_future_task_is_a_configurable_python_task(ex):
    t = ex.future_task(mul, ex.submit(add, 1, 2), 5)
    assert isinstance(t, vinehpc.PythonTask)
    t.set_cores(1)
    t.set_tag("tailored")
    f = ex.submit(t)
    assert f.result(timeout=30) == 15 and f is t.future
    with pytest.raises(ValueError, match="already submitted"):
        ex.submit(t)


@pytest.mark.timeout(60)
def test_future_funcall_calls_a_library_function_by_name(ex):
    lib = ex.create_library_from_functions("lib", add, mul)
    ex.install_library(lib)
    call = ex.future_funcall("lib", "mul", 6, 7)
    assert isinstance(call, vinehpc.FunctionCall)       # the installed library runs it, warm
    f = ex.submit(call)
    assert ex.submit(ex.future_funcall("lib", "add", f, 1)).result(timeout=30) == 43
    with pytest.raises(ValueError, match="no function 'nope'"):
        ex.future_funcall("lib", "nope")


@pytest.mark.timeout(60)
def test_future_tasks_output_is_a_method_that_waits_as_taskvines(ex, tmp_path):
    """TaskVine's FuturePythonTask/FutureFunctionCall.output(timeout) is a method: the value, or
    the exception raised as a value; not submitted yet: an error saying what to do."""
    gate = str(tmp_path / "gate")
    t = ex.future_task(wait_for_file, gate)
    with pytest.raises(RuntimeError, match="this call of wait_for_file was not submitted: submit it with the ex"):
        t.output()
    ex.submit(t)
    with pytest.raises(cf.TimeoutError):
        t.output(timeout=0.2)
    with pytest.raises(ValueError, match="give seconds, None or"):
        t.output(timeout="soon")
    _open(gate)
    assert t.output() == "gate" and t.output(timeout=5) == "gate"
    bad = ex.future_task(fail, "out")
    ex.submit(bad)
    err = bad.output(timeout=30)
    assert isinstance(err, KeyError) and "out" in str(err)
    lib = ex.create_library_from_functions("lib-out", add)
    ex.install_library(lib)
    call = ex.future_funcall("lib-out", "add", 2, 3)
    ex.submit(call)
    assert call.output("wait_forever") == 5


def test_taskvine_futures_module_names_port_by_the_module_name():
    """`from ndcctools.taskvine.futures import ...` -> `from vinehpc.futures import ...`."""
    from vinehpc import futures
    from vinehpc.futures import (ALL_COMPLETED, FIRST_COMPLETED, FuturePythonTask, FuturesExecutor,  # noqa: F401
                                 as_completed, wait)
    assert wait is cf.wait and as_completed is cf.as_completed and FuturesExecutor is vinehpc.FuturesExecutor
    assert vinehpc.FunctionCallNoResult is vinehpc.PythonTaskNoResult
    star = {}
    exec("from vinehpc.futures import *", star)         # a ported `import *` gets them too
    assert {"FuturesExecutor", "wait", "as_completed", "FuturePythonTask", "FIRST_COMPLETED"} <= set(star)
    assert star["FuturesExecutor"] is vinehpc.FuturesExecutor and futures.__all__


# ------------------------------------------------------------------ reduce, allpairs, TaskVine's map
@pytest.mark.timeout(60)
def test_reduce_folds_as_a_tree_of_tasks(ex):
    m = ex.manager
    before = len(read_journal(m, "done"))
    assert ex.reduce(add, range(1, 101), chunk_size=4).result(timeout=30) == 5050
    # 100 values, 5 per task: 20 + 4 + 1 tasks
    poll(lambda: len(read_journal(m, "done")) - before >= 25, 10, "the journal", m=m)
    assert len(read_journal(m, "done")) - before == 25
    assert ex.reduce(add3, range(1, 10)).result(timeout=30) == 45               # 3 values per call
    assert ex.reduce(add, [ex.submit(mul, 2, 3), 4, ex.submit(mul, 5, 6)]).result(timeout=30) == 40
    assert ex.reduce(max, [3, 9, 2]).result(timeout=30) == 9                    # no signature: binary
    assert ex.reduce(add, [5]).result(timeout=30) == 5
    with pytest.raises(ValueError, match="empty"):
        ex.reduce(add, [])
    with pytest.raises(ValueError, match="cannot be reduced"):
        ex.reduce(add3, [1, 2])


@pytest.mark.timeout(60)
def test_allpairs_is_a_table_with_a_row_per_b(ex):
    table = ex.allpairs(mul, [1, 2, 3], [10, 100], chunk_size=4).result(timeout=30)
    assert table == [[10, 20, 30], [100, 200, 300]]
    assert ex.allpairs(add, ["a"], ["x", "y"]).result(timeout=30) == [["ax"], ["ay"]]
    assert ex.allpairs(add, [], ["x"]).result(timeout=30) == [[]]
    bad = ex.allpairs(fail, [1], [2])
    assert isinstance(bad.exception(timeout=30), TypeError)      # fail() takes one argument


@pytest.mark.timeout(90)
def test_futures_executor_takes_taskvines_constructor_and_map(tmp_path, monkeypatch):
    monkeypatch.setenv("VINEHPC_RUN_DIR", str(tmp_path / "runs"))
    fx = vinehpc.FuturesExecutor(port=0, batch_type="local", manager_name="fx", factory=True,
                                 opts={"min-workers": 1, "cores": 2}, log_file="/dev/null")
    try:
        assert fx.port == fx.manager.port and fx.manager_name == "fx" and fx.factory is None
        assert fx.manager.wait_for_workers(1, timeout=30) == 1
        assert [w["resources"]["cores"] for w in fx.manager.workers()] == [2]
        fx.set("max-workers", 3)
        assert fx.get("max-workers") == 3
        assert fx.map(add, [(1, 2), (3, 4), (5, 6)], chunk_size=2).result(timeout=30) == [3, 7, 11]
        assert fx.map(str, range(3)).result(timeout=30) == ["0", "1", "2"]
        assert fx.submit(fx.future_task(add, 1, 1)).result(timeout=30) == 2
        tree = process_tree(fx.manager._local.pids())
    finally:
        fx.shutdown()
    assert fx.manager.closed
    assert_no_survivors(tree, timeout=15, what="the FuturesExecutor's local workers")


@pytest.mark.timeout(60)
def test_futures_executor_port_range_takes_the_first_free_port(tmp_path, monkeypatch):
    monkeypatch.setenv("VINEHPC_RUN_DIR", str(tmp_path / "runs"))
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        low = taken.getsockname()[1]
        try:
            fx = vinehpc.FuturesExecutor(port=[low, low + 1], factory=False)
        except OSError:
            pytest.skip("port %d is taken too" % (low + 1))
        try:
            assert fx.port == low + 1
        finally:
            fx.shutdown()
        assert fx.manager.closed
