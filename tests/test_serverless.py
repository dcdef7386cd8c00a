"""Serverless libraries (vinehpc/serverless.py) and Manager.map/pair/tree_reduce (vinehpc/patterns.py):
real managers and workers, plus the worker state machine's function slots by events."""
from __future__ import annotations

import math
import os
import signal
import sys
import time

import cloudpickle
import pytest

import vinehpc
from vinehpc import FunctionCall, LibraryTask, PythonTask, RemoteTraceback
from vinehpc.worker.events import FunctionReceived, OnInterpreter, PresentTask, StartTask, TaskFinished, TaskReceived
from vinehpc.worker.events import TaskSpec
from vinehpc.worker.state import WorkerState

from conftest import poll, read_journal, wait_all

cloudpickle.register_pickle_by_value(sys.modules[__name__])

COUNT = 0


def add(x, y=0):
    return x + y


def counter():
    """How many calls this library state has seen (direct: grows; fork: always 1)."""
    global COUNT
    COUNT += 1
    return COUNT


def divide(a, b):
    return a / b


def hoisted_sqrt(x):
    return math.sqrt(x)


def imported_names():
    # bound only by the library's `imports` (TaskVine's older form), not by this module
    return m.sqrt(4), unif(1, 1), path_mod.basename("/a/b")   # noqa: F821


def context(a, y=1):
    return {"base": a ** y, "pid": os.getpid()}


def with_base(x):
    return vinehpc.load_variable_from_library("base") + x


def span(seconds):
    t0 = time.time()
    time.sleep(seconds)
    return t0, time.time()


def load_token():
    return {"token": os.urandom(8).hex()}


def token():
    return vinehpc.load_variable_from_library("token")


def read_model(path):
    with open(path) as f:
        return {"model": f.read()}


def model_says(x):
    return "%s %s" % (vinehpc.load_variable_from_library("model"), x)


def die():
    os._exit(3)


def slow_pid(seconds):
    time.sleep(seconds)
    return os.getpid()


def task_marks():
    """VINEHPC_TASK as the call sees it, and as a process it starts inherits it."""
    import subprocess
    return os.environ.get("VINEHPC_TASK"), subprocess.check_output(["sh", "-c", "echo $VINEHPC_TASK"]).decode().strip()


def install(m, name, *fns, **kw):
    lib = m.create_library_from_functions(name, *fns, **kw)
    m.install_library(lib)
    return lib


def run(m, tasks, timeout=30):
    for t in tasks:
        m.submit(t)
    wait_all(m, len(tasks), timeout=timeout)
    return tasks


# ---------------------------------------------------------------- calls
@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["direct", "fork"])
def test_calls_return_values_and_keep_or_reset_library_state(manager, mode):
    m = manager
    install(m, "lib", add, counter, with_base, exec_mode=mode, library_context_info=[context, [2], {"y": 3}])
    calls = run(m, [FunctionCall("lib", "add", i, y=1) for i in range(30)]
                + [FunctionCall("lib", "with_base", 1)] + [FunctionCall("lib", "counter") for _ in range(6)])
    assert [t.output for t in calls[:30]] == [i + 1 for i in range(30)]
    assert all(t.successful() for t in calls)
    assert calls[30].output == 9          # the context ran: 2 ** 3, read with load_variable_from_library
    counts = [t.output for t in calls[31:]]
    if mode == "fork":
        assert counts == [1] * 6           # every call starts from the library as loaded
    else:
        assert max(counts) > 1             # calls share the warm library's state


def hog(mb):
    return len(bytearray(mb * 2 ** 20))


@pytest.mark.timeout(90)
def test_sequential_calls_report_what_they_measured_in_the_journals_order(manager):
    """A call that starts at once on an idle interpreter has its result sent before the worker's
    state machine books its start (worker/loop.py, DEFER_WAIT): the manager sees the same -- the
    value, measured resources, and each task's records in their order."""
    m = manager
    install(m, "seq", add, exec_mode="direct")
    done = []
    for i in range(30):
        t = FunctionCall("seq", "add", i, 1) if i % 2 else PythonTask(add, i, 1)
        m.submit(t)
        back = m.wait(30)
        assert back is t and t.successful() and t.output == i + 1, (t.result, t.reason)
        measured = t.resources_measured
        assert measured["wall"] > 0 and measured["procs"] == 1 and {"cores", "memory"} <= set(measured), measured
        done.append(t.id)
    order = {}
    for rec in read_journal(m):
        if rec.get("task") in done:
            order.setdefault(rec["task"], []).append(rec["event"])
    for tid in done:
        assert order[tid][0] == "submitted" and order[tid][-1] == "done", order[tid]
        assert order[tid].index("dispatched") < order[tid].index("done"), order[tid]
    assert all(r.get("measured") for r in read_journal(m, "done") if r.get("task") in done)


@pytest.mark.timeout(90)
def test_a_sequential_python_task_over_its_memory_is_not_reported_a_success(manager):
    """A prestarted task whose interpreter reports more memory than it was given goes the state
    machine's way (retried larger), not the early result's."""
    t = PythonTask(hog, 150).set_memory(40)
    manager.submit(t)
    assert manager.wait(60) is t
    retried = [r for r in read_journal(manager, "retry larger") if r.get("task") == t.id]
    assert retried and retried[0]["resource"] == "memory" and retried[0]["was"] == 40, retried
    assert t.successful() and t.output == 150 * 2 ** 20


@pytest.mark.timeout(60)
def test_each_call_is_marked_with_its_own_task_id_and_the_mark_goes_with_it(manager):
    """VINEHPC_TASK (whose left-over processes are whose: worker/orphans.py) is the running
    call's id in the interpreter and in what it starts; set and removed around each call, plain
    calls (answered before the interpreter undoes it) and PythonTasks alike."""
    m = manager
    install(m, "marks", task_marks)
    tasks = run(m, [FunctionCall("marks", "task_marks") if i % 2 else PythonTask(task_marks) for i in range(8)])
    assert [t.output for t in tasks] == [(str(t.id), str(t.id)) for t in tasks]


@pytest.mark.timeout(60)
def test_library_is_sent_once_per_worker_and_hoisted_modules_are_usable(manager):
    m = manager
    lib = install(m, "lib", hoisted_sqrt, hoisting_modules=[math])
    calls = run(m, [FunctionCall(lib, hoisted_sqrt, 16.0) for _ in range(20)])   # library and function objects
    assert {t.output for t in calls} == {4.0}
    fid = lib._bytes()[0]
    assert {t._fid for t in calls} == {fid}
    install(m, "lib2", imported_names, imports={"math": "m", "random": {"uniform": "unif"}, "os.path": "path_mod"})
    t, = run(m, [FunctionCall("lib2", "imported_names")])
    assert t.output == (2.0, 1.0, "b")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["direct", "fork"])
def test_an_exception_in_a_call_is_its_failure_with_the_remote_traceback(manager, mode):
    m = manager
    install(m, "lib", divide, exec_mode=mode)
    bad, good = run(m, [FunctionCall("lib", "divide", 1, 0), FunctionCall("lib", "divide", 1, 4)])
    assert not bad.successful() and bad.result == "failed"
    assert isinstance(bad.exception, ZeroDivisionError)
    assert isinstance(bad.exception.__cause__, RemoteTraceback) and "divide" in str(bad.exception.__cause__)
    assert good.output == 0.25


@pytest.mark.timeout(60)
def test_library_inputs_go_with_its_calls_for_its_context_to_read(manager):
    m = manager
    lib = m.create_library_from_functions("lib", model_says, library_context_info=[read_model, ["model.txt"], {}])
    lib.add_input(m.declare_buffer("hello", cache=True), "model.txt")
    m.install_library(lib)
    calls = run(m, [FunctionCall("lib", "model_says", i) for i in range(4)])
    assert [t.output for t in calls] == ["hello %d" % i for i in range(4)]


@pytest.mark.timeout(60)
def test_a_forked_call_that_dies_fails_alone_and_the_library_goes_on(manager):
    m = manager
    install(m, "lib", die, counter, exec_mode="fork")
    dead, = run(m, [FunctionCall("lib", "die")])
    assert dead.result == "failed" and "forked call died" in str(dead.exception)
    assert "exit code 3" in str(dead.exception)
    after = run(m, [FunctionCall("lib", "counter") for _ in range(4)])
    assert [t.output for t in after] == [1] * 4


def test_a_call_to_a_library_not_installed_fails_at_submit_naming_the_fix(manager):
    m = manager
    with pytest.raises(ValueError, match=r"library 'nope' is not installed.*create_library_from_functions"
                                         r".*install_library"):
        m.submit(FunctionCall("nope", "f", 1))
    install(m, "lib", add)
    with pytest.raises(ValueError, match=r"library 'lib' has no function 'sub' \(it has: add\)"):
        m.submit(FunctionCall("lib", "sub", 1))
    with pytest.raises(TypeError, match="install_library"):
        m.submit(m.create_library_from_functions("lib2", add))
    with pytest.raises(TypeError, match="named functions"):
        m.create_library_from_functions("lib3", lambda x: x)


@pytest.mark.timeout(60)
def test_remove_library_refuses_later_calls_and_it_can_be_installed_again(manager):
    m = manager
    install(m, "lib", add)
    assert m.check_library_exists("lib")
    first, = run(m, [FunctionCall("lib", "add", 1, 2)])
    m.remove_library("lib")
    assert not m.check_library_exists("lib")
    with pytest.raises(ValueError, match="not installed"):
        m.submit(FunctionCall("lib", "add", 1))
    with pytest.raises(KeyError):
        m.remove_library("lib")
    install(m, "lib", add, counter)
    again, = run(m, [FunctionCall("lib", "add", 3, 4)])
    assert (first.output, again.output) == (3, 7)


@pytest.mark.timeout(60)
def test_remove_library_makes_interpreters_drop_its_loaded_state(make_manager):
    m = make_manager(local_workers=1)         # one core: one interpreter runs every call
    m.wait_for_workers(1, timeout=30)
    make = lambda: install(m, "lib", token, exec_mode="direct", library_context_info=[load_token, [], {}])
    make()
    before = {t.output for t in run(m, [FunctionCall("lib", "token") for _ in range(3)])}
    m.remove_library("lib")
    make()                                    # the same content: the same library id, sent again
    after = {t.output for t in run(m, [FunctionCall("lib", "token") for _ in range(3)])}
    assert len(before) == 1 and len(after) == 1 and before != after     # its context ran again


def test_core_forget_function_reaches_the_workers_that_have_it():
    from vinehpc.core import Core
    from vinehpc.core import events as ev
    from vinehpc.core.commands import DropFunction
    core = Core()
    for wid in (1, 2):
        core.handle(ev.WorkerJoined(wid, {"cores": 1, "memory": 100, "disk": 100, "gpus": 0, "host": "h"}), 0.0)
    core.workers[1].fns = {"lib-1"}       # (what placement does at its first call there)
    assert core.handle(ev.ForgetFunction("lib-1"), 1.0) == [DropFunction(1, "lib-1")]
    assert "lib-1" in core.workers[1].fns       # its bytes stay there


@pytest.mark.timeout(60)
@pytest.mark.parametrize("slots,overlap", [(1, False), (None, True)])
def test_function_slots_bound_the_calls_of_a_library_running_at_once(make_manager, slots, overlap):
    m = make_manager(local_workers=1, cores_per_worker=2)
    m.wait_for_workers(1, timeout=30)
    lib = m.create_library_from_functions("lib", span, exec_mode="direct")
    if slots:
        lib.set_function_slots(slots)
    m.install_library(lib)
    spans = sorted(t.output for t in run(m, [FunctionCall("lib", "span", 0.4) for _ in range(4)]))
    overlaps = any(b[0] < a[1] for a, b in zip(spans, spans[1:]))
    assert overlaps == overlap, spans


@pytest.mark.timeout(90)
def test_a_call_on_a_worker_lost_mid_call_runs_again_elsewhere(manager):
    m = manager
    install(m, "lib", slow_pid, exec_mode="direct")
    t = FunctionCall("lib", "slow_pid", 3.0)
    m.submit(t)
    rec = poll(lambda: read_journal(m, "dispatched"), 20, "the call dispatched", m=m)[0]
    joined = {r["worker"]: r["pid"] for r in read_journal(m, "worker joined")}
    os.kill(joined[rec["worker"]], signal.SIGKILL)
    wait_all(m, 1, timeout=60)
    assert t.successful() and t.worker != rec["worker"]
    assert isinstance(t.output, int)


def test_library_task_setters_and_resources_shared_by_slots():
    lib = LibraryTask("lib")
    lib.functions["add"] = add
    lib.set_cores(4).set_memory(1000)
    lib.set_function_slots(2)
    with pytest.raises(ValueError):
        lib.set_function_slots(0)
    with pytest.raises(ValueError):
        lib.set_exec_mode("thread")
    assert lib.get_library_provided() == "lib"
    from vinehpc.serverless import per_call
    assert per_call(lib) == {"cores": 2, "memory": 500}


def test_taskvines_infile_load_mode_cloudpickle_is_accepted_and_others_name_the_fix(manager):
    for key in ("function_infile_load_mode", "infile_load_mode"):
        lib = manager.create_library_from_functions("lib-mode", add, **{key: "cloudpickle"})
        assert lib.functions == {"add": add}
        with pytest.raises(NotImplementedError, match="travel pickled"):
            manager.create_library_from_functions("lib-mode", add, **{key: "json"})


# ---------------------------------------------------------------- the worker's function slots, by events
def call_spec(tid, fid="lib-1", slots=1):
    return TaskSpec(tid, None, fid, res={"cores": 1, "memory": 0, "disk": 0, "gpus": 0}, pipe=True, slots=slots)


def test_worker_state_starts_a_library_call_only_in_a_free_slot():
    st = WorkerState({"cores": 4, "memory": 1000, "disk": 1000, "gpus": 0})
    for fid in ("lib-1", "lib-2"):
        st.handle(FunctionReceived(fid), 0.0)
    started = lambda out: [c.spec.id for c in out if isinstance(c, StartTask)]
    assert started(st.handle(TaskReceived(call_spec(1)), 0.0)) == [1]
    assert started(st.handle(TaskReceived(call_spec(2)), 0.0)) == []          # the slot is taken
    assert started(st.handle(TaskReceived(call_spec(3, fid="lib-2")), 0.0)) == [3]   # another library's
    # a busy interpreter of another library is not given the waiting call (it would overrun the slot)
    assert not [c for c in st.handle(OnInterpreter(3, "r3"), 0.0) if isinstance(c, PresentTask)]
    # one of the same library's is: it takes over the slot when the running call returns
    out = st.handle(OnInterpreter(1, "r1"), 0.0)
    assert [c.spec.id for c in out if isinstance(c, PresentTask)] == [2]
    st.handle(TaskFinished(1, result=b"x", runner="r1"), 1.0)
    assert st.runs[2].state == "running" and st.lib_running == {"lib-1": 1, "lib-2": 1}
    st.handle(TaskFinished(2, result=b"x", runner="r1"), 2.0)
    assert st.lib_running["lib-1"] == 0


# ---------------------------------------------------------------- map, pair, tree_reduce
def square(x):
    return x * x


def product(p):
    return p[0] * p[1]


def inverse(x):
    return 1 / x


def biggest(xs):
    return max(xs)


@pytest.mark.timeout(90)
def test_map_pair_tree_reduce_in_order_without_taking_the_users_tasks(manager):
    m = manager
    mine = m.submit(PythonTask(square, 100))
    assert m.map(square, list(range(10))) == [x * x for x in range(10)]
    assert m.map(square, list(range(10)), 4) == [x * x for x in range(10)]
    assert m.pair(product, [1, 2, 3], [10, 20], 4) == [10, 20, 20, 40, 30, 60]
    assert m.tree_reduce(biggest, [3, 17, 5, 11, 2]) == 17
    assert m.tree_reduce(biggest, list(range(50)), 7) == 49
    t = m.wait(30)                   # the user's own task is still theirs
    assert t.id == mine and t.output == 10000 and m.empty()


@pytest.mark.timeout(60)
def test_map_puts_an_elements_exception_in_its_place_and_tree_reduce_raises_it(manager):
    m = manager
    out = m.map(inverse, [1, 0, 4], 2)
    assert out[0] == 1.0 and isinstance(out[1], ZeroDivisionError) and out[2] == 0.25
    with pytest.raises(ValueError):
        m.tree_reduce(biggest, [])
    with pytest.raises(TypeError):
        m.tree_reduce(biggest, [1, "a"])     # max(1, "a") raises on the worker


@pytest.mark.timeout(60)
def test_remote_map_pair_tree_reduce_run_as_function_calls(manager):
    m = manager
    install(m, "lib", square, product, biggest, inverse, exec_mode="direct")
    assert m.remote_map("square", [1, 2, 3], "lib", "x") == [1, 4, 9]
    assert m.remote_pair("product", [1, 2], [3], "lib", "x") == [3, 6]
    assert m.remote_tree_reduce("biggest", [4, 9, 1], "lib", "x") == 9
    assert isinstance(m.remote_map("inverse", [0], "lib")[0], ZeroDivisionError)
    assert len([r for r in read_journal(m, "dispatched")]) >= 7


@pytest.mark.timeout(60)
def test_a_call_gets_the_librarys_resources_shared_by_its_slots_unless_it_sets_its_own(manager):
    m = manager
    lib = m.create_library_from_functions("lib", add).set_memory(200).set_function_slots(2)
    m.install_library(lib)
    shared, own = FunctionCall("lib", "add", 1), FunctionCall("lib", "add", 2).set_memory(50)
    run(m, [shared, own])
    assert (shared.resources["memory"], own.resources["memory"]) == (100, 50)
    assert (shared.output, own.output) == (1, 2)
