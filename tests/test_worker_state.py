"""The worker's state machine (vinehpc/worker/state.py): events in, commands out; no sockets,
processes or files."""
from __future__ import annotations

import pytest

from vinehpc.protocol import ProtocolError, messages
from vinehpc.worker.events import (DropTask, Exhausted, FetchURL, FileFailed, FileStored, FunctionReceived,
                                   Input, InputFailed, InputReady, InterpreterDied, KillRequested, KillTask,
                                   OnInterpreter, Output, PresentTask, Requeued, SendCached, SendResult,
                                   SessionEnded, StartFailed, StartTask, TaskFinished, TaskReceived, TaskSpec,
                                   Tick, Unlink, UnlinkRequested, UnpackImage)
from vinehpc.worker.state import DEPTH, GHOST_LIMIT, WorkerState


def res(cores=1, memory=0, disk=0, gpus=0):
    return {"cores": cores, "memory": memory, "disk": disk, "gpus": gpus}


def cmd_task(tid, cores=1, **kw):
    return TaskSpec(tid, "true", None, res=res(cores, gpus=kw.pop("gpus", 0)), **kw)


def py_task(tid, cores=1, pipe=True, **kw):
    return TaskSpec(tid, None, "f1", res=res(cores, gpus=kw.pop("gpus", 0)), pipe=pipe, report_start=pipe, **kw)


def worker(cores=2, gpus=(), files=None):
    st = WorkerState(res(cores, 1000, 1000, len(gpus)), gpus, files=files)
    st.handle(FunctionReceived("f1"), 0.0)
    return st


def of(cmds, kind):
    return [c for c in cmds if isinstance(c, kind)]


def started(cmds):
    return [c.spec.id for c in of(cmds, StartTask)]


def results(cmds):
    return {c.tid: c for c in of(cmds, SendResult)}


def submit(st, spec, now=0.0, args=None):
    return st.handle(TaskReceived(spec, args), now)


# ---------------------------------------------------------------- queueing by resources
def test_tasks_wait_for_cores_and_start_as_others_end():
    st = worker(cores=2)
    assert started(submit(st, cmd_task(1))) == [1]
    assert started(submit(st, cmd_task(2))) == [2]
    assert submit(st, cmd_task(3)) == []                    # no core left: queued
    assert st.used["cores"] == 2 and [r.spec.id for r in st.queue] == [3]
    out = st.handle(TaskFinished(1, exit_code=0), 5.0)
    assert [type(c) for c in out] == [SendResult, StartTask]   # the result first, then the next task
    r = results(out)[1]
    assert (r.status, r.reason, r.collect, r.wall) == ("success", None, True, 5.0)
    assert started(out) == [3] and st.used["cores"] == 2


def test_a_task_larger_than_the_worker_runs_alone():
    st = worker(cores=2)
    assert started(submit(st, cmd_task(1, cores=1))) == [1]
    assert submit(st, cmd_task(2, cores=4)) == []
    assert started(submit(st, cmd_task(3, cores=1))) == [3]    # a smaller one behind it passes
    st.handle(TaskFinished(1, exit_code=0), 1.0)
    assert started(st.handle(TaskFinished(3, exit_code=0), 1.0)) == [2]
    assert st.used["cores"] == 4


def test_gpu_ids_held_by_running_tasks():
    st = worker(cores=4, gpus=("0", "1"))
    a = of(submit(st, cmd_task(1, gpus=1)), StartTask)[0]
    b = of(submit(st, cmd_task(2, gpus=1)), StartTask)[0]
    c = of(submit(st, cmd_task(3)), StartTask)[0]
    assert (a.devices, b.devices, c.devices) == ("0", "1", "")   # no GPU: sees none
    assert submit(st, cmd_task(4, gpus=1)) == [] and st.gpu_free == []
    d = of(st.handle(TaskFinished(2, exit_code=0), 1.0), StartTask)[0]
    assert d.spec.id == 4 and d.devices == "1"
    st.handle(TaskFinished(4, exit_code=0), 2.0)
    assert st.gpu_free == ["1"]


def test_no_gpus_on_the_worker_leaves_cuda_alone():
    st = worker()
    assert of(submit(st, cmd_task(1)), StartTask)[0].devices is None


def test_command_statuses():
    st = worker(cores=4)
    for tid in (1, 2, 3):
        submit(st, cmd_task(tid))
    assert results(st.handle(TaskFinished(1, exit_code=3, stdout="x"), 1.0))[1].reason == "exit code 3"
    r = results(st.handle(TaskFinished(2, exit_code=127), 1.0))[2]
    assert (r.status, r.reason, r.collect) == ("failed", "command not found (exit code 127)", True)
    r = results(st.handle(TaskFinished(3, exit_code=137, signal="SIGKILL(-9)"), 1.0))[3]
    assert (r.status, r.reason, r.signal) == ("failed", "killed by SIGKILL(-9)", "SIGKILL(-9)")


def test_start_failure_frees_the_resources():
    st = worker(cores=1)
    submit(st, cmd_task(1))
    submit(st, cmd_task(2))
    out = st.handle(StartFailed(1, "cannot start: no space", worker_fault=True), 1.0)
    r = results(out)[1]
    assert (r.status, r.worker_fault, r.collect) == ("failed", True, False)
    assert started(out) == [2]


# ---------------------------------------------------------------- pipelining
def _busy_interpreter(st, tid=1, runner="r1", **kw):
    out = submit(st, py_task(tid, **kw))
    assert started(out) == [tid]
    return st.handle(OnInterpreter(tid, runner), 0.0)


def test_next_python_task_is_presented_to_the_busy_interpreter():
    st = worker(cores=1)
    assert _busy_interpreter(st) == []
    out = submit(st, py_task(2), now=1.0, args=b"args")
    [p] = of(out, PresentTask)
    assert (p.spec.id, p.runner, p.args) == (2, "r1", b"args")
    assert st.used["cores"] == 1                            # presented: holds nothing yet
    out = st.handle(TaskFinished(1, result=b"r", runner="r1"), 2.0)
    assert results(out)[1].result == b"r" and started(out) == []
    assert st.runs[2].state == "running" and st.runs[2].started == 2.0   # its clock runs from now
    r = results(st.handle(TaskFinished(2, result=b"r2", runner="r1"), 2.5))[2]
    assert r.wall == 0.5 and r.status == "success"


@pytest.mark.parametrize("second", [
    cmd_task(2),                         # a command
    py_task(2, pipe=False),              # not a short category
    py_task(2, cores=2),                 # larger than the running task
])
def test_what_is_not_presented(second):
    st = worker(cores=1)
    _busy_interpreter(st)
    assert of(submit(st, second), PresentTask) == []


def test_not_presented_to_an_interpreter_of_another_image():
    st = worker(cores=1, files={"img": "workflow"})
    st.images.add("img")
    _busy_interpreter(st)
    spec = py_task(2, inputs=(Input("img", "img", "image", "workflow", None),))
    assert of(submit(st, spec), PresentTask) == []


def test_the_python_error_fails_the_task():
    st = worker(cores=1)
    _busy_interpreter(st)
    r = results(st.handle(TaskFinished(1, result=b"exc", error="ValueError: x", runner="r1"), 1.0))[1]
    assert (r.status, r.reason, r.result) == ("failed", "ValueError: x", b"exc")


def test_interpreter_death_requeues_the_presented_task():
    st = worker(cores=1)
    _busy_interpreter(st)
    submit(st, py_task(2))
    out = st.handle(InterpreterDied(1, "r1", "signal SIGSEGV"), 1.0)
    assert [type(c) for c in out] == [Requeued, SendResult, StartTask]
    assert "interpreter running the task died (signal SIGSEGV)" in results(out)[1].reason
    assert started(out) == [2]


# ---------------------------------------------------------------- kills
def test_kill_of_a_queued_task_sends_nothing():
    st = worker(cores=1)
    submit(st, cmd_task(1))
    submit(st, cmd_task(2))
    assert st.handle(KillRequested(2), 1.0) == [DropTask(2, stop=False)]
    assert not st.queue or all(r.state == "done" for r in st.queue)
    assert started(st.handle(TaskFinished(1, exit_code=0), 2.0)) == []


def test_kill_of_a_running_task_stops_it_and_starts_the_next():
    st = worker(cores=1)
    submit(st, cmd_task(1))
    submit(st, cmd_task(2))
    out = st.handle(KillRequested(1), 1.0)
    assert out[0] == DropTask(1, stop=True) and started(out) == [2] and not results(out)


def test_kill_of_a_running_python_task_requeues_its_presented_task():
    st = worker(cores=1)
    _busy_interpreter(st)
    submit(st, py_task(2))
    out = st.handle(KillRequested(1), 1.0)
    assert [type(c) for c in out] == [Requeued, DropTask, StartTask]
    assert out[1] == DropTask(1, stop=True) and started(out) == [2]


def test_kill_of_a_presented_task_keeps_its_turn_and_resources():
    st = worker(cores=1)
    _busy_interpreter(st)
    submit(st, py_task(2))
    assert st.handle(KillRequested(2), 1.0) == [DropTask(2, stop=False)]
    [p] = of(submit(st, py_task(3)), PresentTask)            # behind 2: the interpreter runs 2 anyway
    assert p.spec.id == 3
    out = st.handle(TaskFinished(1, runner="r1"), 2.0)
    assert list(results(out)) == [1] and started(out) == [] and st.used["cores"] == 1   # 2's turn holds its core
    assert st.handle(TaskFinished(2, runner="r1"), 2.1) == []    # the dropped task's result: ignored
    assert st.runs[3].state == "running" and st.runs[3].started == 2.1 and st.used["cores"] == 1
    assert list(results(st.handle(TaskFinished(3, result=b"r", runner="r1"), 2.2))) == [3]
    assert st.used["cores"] == 0


def test_a_dropped_task_with_nothing_behind_it_frees_its_core_when_it_returns():
    st = worker(cores=1)
    _busy_interpreter(st)
    submit(st, py_task(2))
    st.handle(KillRequested(2), 1.0)
    st.handle(TaskFinished(1, runner="r1"), 2.0)
    assert submit(st, cmd_task(3)) == [] and st.used["cores"] == 1
    assert started(st.handle(TaskFinished(2, runner="r1"), 2.1)) == [3]


def test_a_dropped_task_that_runs_on_gets_its_interpreter_killed():
    st = worker(cores=1)
    _busy_interpreter(st)
    submit(st, py_task(2))
    submit(st, py_task(3))
    st.handle(KillRequested(2), 1.0)
    st.handle(TaskFinished(1, runner="r1"), 2.0)             # 2's turn: nobody wants its result
    assert st.next_deadline() == 2.0 + GHOST_LIMIT
    assert st.handle(Tick(), 2.0 + GHOST_LIMIT) == [KillTask(2)]
    assert st.handle(Tick(), 3.0 + GHOST_LIMIT) == []        # asked once
    out = st.handle(InterpreterDied(2, "r1", "signal SIGKILL"), 4.0 + GHOST_LIMIT)
    assert [c.tid for c in of(out, Requeued)] == [3] and started(out) == [3] and st.used["cores"] == 1
    assert not st.ghosts and not st.presented


def test_up_to_depth_tasks_wait_in_an_interpreter_lane_and_run_in_order():
    st = worker(cores=1)
    _busy_interpreter(st)
    presented = [of(submit(st, py_task(t)), PresentTask) for t in range(2, 2 + DEPTH + 1)]
    assert [len(p) for p in presented] == [1] * DEPTH + [0]       # the lane is full: the next one waits
    assert [p[0].runner for p in presented[:DEPTH]] == ["r1"] * DEPTH
    for t in range(1, 1 + DEPTH):
        out = st.handle(TaskFinished(t, result=b"r", runner="r1"), float(t))
        assert list(results(out)) == [t] and st.runs[t + 1].state == "running" and st.used["cores"] == 1
        assert [p.spec.id for p in of(out, PresentTask)] == ([2 + DEPTH] if t == 1 else [])


def test_starts_told_to_the_manager_are_batched_in_start_order():
    """Only tasks whose message says so (report_start: sent ahead) are told; a lane's next task
    starts when the worker sees the one before it return; the state keeps the ids until the loop
    takes them (on a result, or in one message at the end of its turn)."""
    st = worker(cores=1)
    submit(st, cmd_task(9))                          # sent with room (no pipe): started, not told
    assert st.take_starts() == []
    st.handle(TaskFinished(9, exit_code=0), 0.5)
    _busy_interpreter(st)                            # 1 starts on arrival: told (it was sent ahead)
    for t in (2, 3):
        assert of(submit(st, py_task(t)), PresentTask)   # presented: not started yet
    assert st.take_starts() == [1] and st.take_starts() == []
    out = st.handle(TaskFinished(1, result=b"r", runner="r1"), 2.0)
    assert list(results(out)) == [1] and st.starts == [2]   # 2 starts as 1 returns
    st.handle(TaskFinished(2, result=b"r", runner="r1"), 3.0)
    assert st.take_starts() == [2, 3]                # one batch for the whole turn, in order
    st.handle(KillRequested(3), 3.5)
    submit(st, py_task(4))
    submit(st, py_task(5))
    st.handle(SessionEnded(), 4.0)
    assert st.take_starts() == []                    # a new manager knows nothing of them


def test_a_url_input_task_tells_its_start():
    st = worker(cores=1)
    spec = TaskSpec.from_message(_task_msg(cmd="true", inputs=[["u", "u", "url", "task", "http://x/u"]]))
    assert spec.report_start and not TaskSpec.from_message(_task_msg(cmd="true")).report_start
    submit(st, spec)
    assert st.starts == []                           # waits for its fetch
    st.handle(InputReady("url", "u"), 1.0)
    assert st.take_starts() == [7]


def test_a_larger_task_is_not_presented_behind_a_smaller_one():
    st = worker(cores=2)
    _busy_interpreter(st, cores=2)
    assert len(of(submit(st, py_task(2, cores=1)), PresentTask)) == 1
    assert of(submit(st, py_task(3, cores=2)), PresentTask) == []     # would need room 2 did not hold


def test_interpreter_death_requeues_its_whole_lane_in_order():
    st = worker(cores=1)
    _busy_interpreter(st)
    submit(st, py_task(2))
    submit(st, py_task(3))
    out = st.handle(InterpreterDied(1, "r1", "signal SIGSEGV"), 1.0)
    assert [c.tid for c in of(out, Requeued)] == [2, 3] and started(out) == [2]
    assert [r.spec.id for r in st.queue if r.state == "queued"] == [3]


# ---------------------------------------------------------------- exhaustion
def test_time_limit():
    st = worker(cores=1)
    submit(st, cmd_task(1, time_max=2.0), now=10.0)
    assert st.next_deadline() == 12.0
    assert st.handle(Tick(), 11.9) == []
    assert st.handle(Tick(), 12.0) == [KillTask(1)]
    assert st.next_deadline() is None and st.handle(Tick(), 13.0) == []   # killed once
    r = results(st.handle(TaskFinished(1, exit_code=137, signal="SIGKILL(-9)", stdout="o"), 12.1))[1]
    assert r.status == "resource exhaustion" and r.reason.startswith("time: 2.0 s used > 2 s allocated")
    assert r.exhausted == {"resource": "time", "used": 2.0, "allocated": 2.0} and not r.collect


def test_memory_over_allocation_while_running():
    st = worker(cores=1)
    submit(st, TaskSpec(1, "x", None, res=res(1, memory=100)))
    assert st.running()[0].spec.id == 1
    x = {"resource": "memory", "used": 150, "allocated": 100}
    assert st.handle(Exhausted(1, x), 1.0) == [KillTask(1)]
    assert st.running() == [] and st.handle(Exhausted(1, x), 1.5) == []
    r = results(st.handle(TaskFinished(1, exit_code=137, signal="SIGKILL(-9)"), 2.0))[1]
    assert (r.status, r.reason, r.exhausted) == ("resource exhaustion", "memory: 150 MB used > 100 MB allocated", x)


def test_over_allocation_found_at_the_end():
    st = worker(cores=1)
    _busy_interpreter(st)
    x = {"resource": "disk", "used": 5, "allocated": 1}
    r = results(st.handle(TaskFinished(1, result=b"r", stdout="s", runner="r1", exhausted=x), 1.0))[1]
    assert (r.status, r.stdout, r.result, r.collect) == ("resource exhaustion", "s", None, False)


def test_killed_python_task_reported_when_its_interpreter_dies():
    st = worker(cores=1)
    submit(st, py_task(1, time_max=1.0))
    st.handle(OnInterpreter(1, "r1"), 0.0)
    assert st.handle(Tick(), 1.0) == [KillTask(1)]
    r = results(st.handle(InterpreterDied(1, "r1", "signal SIGKILL"), 1.1))[1]
    assert r.status == "resource exhaustion"


# ---------------------------------------------------------------- inputs and cache references
def _inp(n, level="workflow", kind="file", url=None):
    return Input(n, n + ".txt", kind, level, url)


def test_task_level_input_unlinked_after_its_last_user():
    st = worker(cores=2, files={"a": "task"})
    submit(st, cmd_task(1, inputs=(_inp("a", "task"),)))
    submit(st, cmd_task(2, inputs=(_inp("a", "task"),)))
    assert st.refs == {"a": 2}
    assert st.handle(UnlinkRequested("a"), 0.5) == []           # in use: stays
    assert of(st.handle(TaskFinished(1, exit_code=0), 1.0), Unlink) == []
    out = st.handle(TaskFinished(2, exit_code=0), 1.0)
    assert [type(c) for c in out] == [SendResult, Unlink]        # outputs collected before the input goes
    assert "a" not in st.files and st.refs == {}


def test_a_stronger_level_keeps_the_file():
    st = worker(files={"a": "task"})
    submit(st, cmd_task(1, inputs=(_inp("a", "workflow"),)))
    assert st.files["a"] == "workflow"
    assert of(st.handle(TaskFinished(1, exit_code=0), 1.0), Unlink) == []
    assert st.handle(UnlinkRequested("a"), 2.0) == [Unlink("a")]


def test_url_fetched_once_for_all_its_users():
    st = worker(cores=2)
    assert submit(st, cmd_task(1, inputs=(_inp("u", kind="url", url="http://x/u"),))) == [FetchURL("u", "http://x/u")]
    assert submit(st, cmd_task(2, inputs=(_inp("u", kind="url", url="http://x/u"),))) == []
    out = st.handle(InputReady("url", "u"), 1.0)
    assert out[0] == SendCached("u") and started(out) == [1, 2] and st.files["u"] == "workflow"


def test_url_failure_fails_its_users():
    st = worker(cores=2)
    submit(st, cmd_task(1, inputs=(_inp("u", kind="url", url="http://x/u"),)))
    submit(st, cmd_task(2, inputs=(_inp("u", kind="url", url="http://x/u"),)))
    out = results(st.handle(InputFailed("url", "u", "404"), 1.0))
    assert {t: (r.status, r.reason) for t, r in out.items()} == {
        1: ("input missing", "cannot fetch u: 404"), 2: ("input missing", "cannot fetch u: 404")}
    assert st.refs == {}


def test_image_unpacked_before_its_task_starts():
    st = worker(files={"img": "workflow"})
    spec = cmd_task(1, inputs=(Input("img", "img", "image", "workflow", "imgid"),))
    assert submit(st, spec) == [UnpackImage("img", "imgid")]
    [s] = of(st.handle(InputReady("image", "img"), 1.0), StartTask)
    assert s.image == "img"


def test_missing_inputs_and_functions():
    st = worker(files={"ok": "workflow"})
    st.handle(FileFailed("full", "cannot store input full: ENOSPC"), 0.0)
    r = results(submit(st, cmd_task(1, inputs=(_inp("ok"), _inp("full")))))[1]
    assert (r.status, r.worker_fault) == ("input missing", True) and st.refs == {}
    r = results(submit(st, cmd_task(2, inputs=(_inp("never"),))))[2]
    assert r.status == "input missing" and "never sent" in r.reason
    r = results(submit(st, TaskSpec(3, None, "f2")))[3]
    assert (r.status, r.reason) == ("failed", "function f2 was never sent to this worker")


def test_temp_output_stored():
    st = worker()
    st.handle(FileStored("t1", "workflow"), 0.0)
    assert st.files == {"t1": "workflow"}


def test_session_end_drops_everything_and_keeps_worker_level_files():
    st = worker(cores=1, files={"w": "worker", "f": "workflow"})
    _busy_interpreter(st)
    submit(st, py_task(2, inputs=(_inp("f"),)))
    submit(st, cmd_task(3))
    out = st.handle(SessionEnded(), 5.0)
    assert not results(out) and not started(out)
    assert DropTask(1, stop=True) in out and Unlink("f") in out and Unlink("w") not in out
    assert st.runs == {} and st.used["cores"] == 0 and st.files == {"w": "worker"} and st.fns == set()


# ---------------------------------------------------------------- the task description
def test_task_sent_twice_is_a_protocol_error():
    st = worker()
    submit(st, cmd_task(1))
    with pytest.raises(ProtocolError):
        submit(st, cmd_task(1))


def _task_msg(**ctl):
    base = {"id": 7, "inputs": [], "outputs": [], "res": res(0), "category": "default"}
    return messages.decode("task", dict(base, **ctl), [])


def test_spec_from_the_task_message():
    s = TaskSpec.from_message(_task_msg(cmd="ls", inputs=[["c1", "in.txt", "file", "task", None]],
                                        outputs=[["out", "temp", "c2"]], res=res(2), time_max=3, pipe=True))
    assert s.inputs == (Input("c1", "in.txt", "file", "task", None),)
    assert s.outputs == (Output("out", "temp", "c2"),)
    assert s.res == res(2) and s.time_max == 3.0 and s.pipe and not s.python and s.error is None
    bad = TaskSpec.from_message(_task_msg(id=8, fid="f", inputs=[["../x", "a", "file", "task", None]]))
    assert bad.error.startswith("bad input description") and bad.inputs == ()
    r = results(submit(worker(), bad))[8]
    assert r.status == "input missing"
    with pytest.raises(ProtocolError):
        _task_msg(id="1", cmd="ls")


# ---------------------------------------------------------------- results sent before the bookkeeping
def test_plain_end_only_where_the_end_is_reported_as_it_is():
    """plain_end: the loop may send a returned Python call's result before the state hears of the
    end only when the state would report exactly that (no kill, no files, nothing riding on it)."""
    st = worker(cores=1)
    submit(st, py_task(1, pipe=False), now=1.0)
    assert st.plain_end(1, "r1") is None                    # not on that interpreter (yet)
    st.handle(OnInterpreter(1, "r1"), 1.0)
    assert st.plain_end(1, "r1") is st.runs[1] and st.plain_end(1, "r2") is None
    submit(st, py_task(2), now=1.5)                         # presented behind it: its start rides on the result
    assert st.plain_end(1, "r1") is None
    st = worker(cores=1)
    submit(st, py_task(1, pipe=False), now=1.0)
    st.handle(OnInterpreter(1, "r1"), 1.0)
    submit(st, cmd_task(2), now=1.5)                        # queued here: its start would follow the end
    assert st.plain_end(1, "r1") is None
    st = worker(cores=1)
    submit(st, py_task(1, pipe=False), now=1.0)
    st.handle(OnInterpreter(1, "r1"), 1.0)
    st.handle(Tick(), 1.0)
    st.handle(Exhausted(1, {"resource": "memory", "used": 5, "allocated": 1}), 1.2)   # being stopped
    assert st.plain_end(1, "r1") is None
    spec = TaskSpec(3, None, "f1", outputs=(Output("out", "file", None),), res=res())
    st = worker(cores=1)
    submit(st, spec)
    st.handle(OnInterpreter(3, "r1"), 0.0)
    assert st.plain_end(3, "r1") is None                    # files: outputs may turn it into "output missing"
    st = worker(cores=1)
    submit(st, cmd_task(4))
    assert st.plain_end(4, None) is None                    # a command: not an interpreter's


def test_a_result_sent_already_is_cleaned_up_not_sent_again():
    st = worker(cores=1)
    submit(st, py_task(1, pipe=False), now=1.0)
    st.handle(OnInterpreter(1, "r1"), 1.0)
    out = st.handle(TaskFinished(1, result=b"r", runner="r1", sent=True), 2.0)
    r = results(out)[1]
    assert (r.status, r.sent, r.result) == ("success", True, b"r")
    assert st.used["cores"] == 0 and 1 not in st.runs        # its resources freed as for any end


@pytest.mark.parametrize("gpus", [(), ("0",)])
def test_starts_now_only_for_what_the_state_starts_at_once(gpus):
    """starts_now (the loop sends such a task to an interpreter before the state hears of it)
    must never say yes to a task the state then does not start at once, on the same devices."""
    lib = TaskSpec(9, None, "f1", res=res(), slots=1)
    cases = [py_task(1, pipe=False), py_task(2), cmd_task(3), py_task(4, cores=3), py_task(5, gpus=1), lib,
             TaskSpec(6, None, "nope", res=res()), TaskSpec(7, None, "f1", outputs=(Output("o", "file", None),),
                                                            res=res())]
    said_yes = 0
    for busy in (0, 1, 2):
        for spec in cases:
            st = worker(cores=2, gpus=gpus)
            for i in range(busy):        # cores taken (the last one by a call of the library with slots)
                submit(st, TaskSpec(100 + i, None, "f1", res=res(), slots=1 if i else None))
            yes = st.starts_now(spec)
            out = submit(st, spec)
            if yes is not None:
                said_yes += 1
                [s] = of(out, StartTask)
                assert s.spec is spec and s.devices == yes[0] and s.image is None
    assert said_yes >= 4
