"""The manager core as a state machine: events in, commands out (habits 5 and 6).

No sockets, no threads, no clock: fake workers join with a resource dict, tasks are
submitted with ids we assign (as Manager.submit does), and the tests read `core.cmds`.
"""
import itertools

import pytest

from vinehpc.core import Core
from vinehpc.core import state as core_state
from vinehpc.file import File, Temp
from vinehpc.task import PythonTask, Task

INFO = {"cores": 2, "memory": 1000, "disk": 1000, "gpus": 0, "host": "h1"}
_ids = itertools.count(1)


def fake_names(f):
    return ("file-%d" % f.id, 100)


def make_core(policy="files"):
    return Core(policy=policy, names=fake_names)


def info(**kw):
    d = dict(INFO)
    d.update(kw)
    return d


def submit(core, task, now=0.0):
    """What Manager.submit does before posting the task to the core."""
    task._check()
    task.id = next(_ids)
    for f, _ in task.outputs:
        f.producer = task.id
    task.state = "submitted"
    core.submit(task, now)
    return task


def new_task(cmd="true", **res):
    t = Task(cmd)
    for k, v in res.items():
        getattr(t, "set_" + k)(v)
    return t


def take(core):
    out = list(core.cmds)
    core.cmds.clear()
    return out


def of(cmds, kind):
    return [c for c in cmds if c[0] == kind]


def dispatched(cmds):
    """[(wid, tid)] of the 'task' commands."""
    return [(c[1], c[2].id) for c in of(cmds, "task")]


def logs(cmds, event):
    return [c[1] for c in of(cmds, "log") if c[1]["event"] == event]


def done(cmds):
    return [c[1] for c in of(cmds, "done")]


def ok(core, wid, task, now=0.0, **extra):
    res = {"status": "success", "exit_code": 0, "wall": 0.01}
    res.update(extra)
    return core.task_done(wid, task.id, res, now)


def fail(core, wid, task, reason="exit code 1", now=0.0):
    return core.task_done(wid, task.id, {"status": "failed", "exit_code": 1, "reason": reason,
                                         "wall": 0.01}, now)


@pytest.fixture
def core():
    return make_core()


@pytest.fixture
def infile(tmp_path):
    """A real file on the manager side (add_input checks existence); its name is faked."""
    def make(cache=True, name="in.txt"):
        p = tmp_path / name
        p.write_text("data")
        return File(str(p), cache)
    return make


# ---------------------------------------------------------------- packing
def test_worker_runs_as_many_tasks_as_cores(core):
    ts = [submit(core, new_task()) for _ in range(5)]
    core.worker_joined(1, INFO, 0.0)
    assert core.schedule(0.0) == 2
    assert dispatched(take(core)) == [(1, ts[0].id), (1, ts[1].id)]
    assert core.schedule(0.0) == 0


def test_finished_task_frees_its_core(core):
    ts = [submit(core, new_task()) for _ in range(3)]
    core.worker_joined(1, INFO, 0.0)
    core.schedule(0.0)
    take(core)
    ok(core, 1, ts[0], wall=1.0)
    core.schedule(0.0)
    assert dispatched(take(core)) == [(1, ts[2].id)]


def test_multicore_task_takes_its_cores(core):
    big = submit(core, new_task(cores=2))
    small = submit(core, new_task())
    core.worker_joined(1, INFO, 0.0)
    core.schedule(0.0)
    assert dispatched(take(core)) == [(1, big.id)]
    assert small.state == "ready"


def _run_fast(core, wid, n, category="default", wall=0.01):
    """Run n tasks of a category to completion on worker wid, one schedule at a time."""
    for _ in range(n):
        t = submit(core, new_task(category=category))
        core.schedule(0.0)
        assert dispatched(take(core)) == [(wid, t.id)]
        ok(core, wid, t, wall=wall)
        take(core)


def test_prefetch_after_fast_tasks_up_to_twice_cores(core):
    core.worker_joined(1, INFO, 0.0)
    _run_fast(core, 1, core_state.SHORT_SAMPLES)
    for _ in range(6):
        submit(core, new_task())
    assert core.schedule(0.0) == 2 * INFO["cores"]


def test_no_prefetch_before_enough_samples(core):
    core.worker_joined(1, INFO, 0.0)
    _run_fast(core, 1, core_state.SHORT_SAMPLES - 1)
    for _ in range(6):
        submit(core, new_task())
    assert core.schedule(0.0) == INFO["cores"]


def test_no_prefetch_for_slow_category(core):
    core.worker_joined(1, INFO, 0.0)
    _run_fast(core, 1, core_state.SHORT_SAMPLES, wall=1.0)
    for _ in range(6):
        submit(core, new_task())
    assert core.schedule(0.0) == INFO["cores"]


def test_prefetch_is_per_category(core):
    core.worker_joined(1, INFO, 0.0)
    _run_fast(core, 1, core_state.SHORT_SAMPLES, category="fast")
    for _ in range(6):
        submit(core, new_task(category="slow"))
    assert core.schedule(0.0) == INFO["cores"]


def test_memory_packing(core):
    a = submit(core, new_task(memory=600))
    b = submit(core, new_task(memory=600))
    c = submit(core, new_task(memory=400))
    core.worker_joined(1, INFO, 0.0)
    core.schedule(0.0)
    # a fits, b does not (1200 > 1000) and waits; c fills the rest
    assert dispatched(take(core)) == [(1, a.id), (1, c.id)]
    assert b.state == "ready"


def test_a_big_task_lets_small_ones_pass_for_a_while_then_a_worker_is_kept_for_it(core):
    """Backfill without starvation: small tasks keep both workers full; the big one waits
    RESERVE_AFTER seconds, then one worker takes nothing new until the big task starts there,
    while the other keeps taking small tasks."""
    core.worker_joined(1, INFO, 0.0)
    core.worker_joined(2, info(host="h2"), 0.0)
    small = [submit(core, new_task(memory=500)) for _ in range(4)]
    core.schedule(0.0)
    running = dict((tid, wid) for wid, tid in dispatched(take(core)))
    assert len(running) == 4
    big = submit(core, new_task(memory=900))
    more = [submit(core, new_task(memory=500)) for _ in range(6)]
    by_id = {t.id: t for t in small + more}
    started = []

    def finish_one(now):
        tid = min(running)                # the oldest running task ends
        ok(core, running.pop(tid), by_id[tid], now=now)
        core.schedule(now)
        cmds = take(core)
        for w, t in dispatched(cmds):
            running[t] = w
            started.append((w, t))
        return [c[1] for c in of(cmds, "log") if c[1]["event"] == "reserved"]

    finish_one(0.5)                       # within the patience: a small task takes the room
    assert big.state == "ready" and len(running) == 4
    now = core_state.RESERVE_AFTER + 1.0
    del started[:]
    recs = finish_one(now)                # the patience is over: a worker is kept for the big task
    assert core.reserved is not None and core.reserved[1] == big.id
    kept = core.reserved[0]
    assert recs and recs[0]["task"] == big.id and recs[0]["worker"] == kept
    while big.state == "ready" and running:
        now += 0.1
        finish_one(now)
    assert big.state == "running" and big._wid == kept and core.reserved is None
    before_big = started[:started.index((kept, big.id))]
    assert before_big and all(w != kept for w, _ in before_big)   # the other worker kept backfilling
    assert len(running) >= 2


def test_disk_packing(core):
    a = submit(core, new_task(disk=700))
    b = submit(core, new_task(disk=700))
    core.worker_joined(1, INFO, 0.0)
    core.schedule(0.0)
    assert dispatched(take(core)) == [(1, a.id)]
    ok(core, 1, a, wall=1.0)
    core.schedule(0.0)
    assert dispatched(take(core)) == [(1, b.id)]


def test_gpu_packing(core):
    a = submit(core, new_task(gpus=1))
    b = submit(core, new_task(gpus=1))
    core.worker_joined(1, info(gpus=0), 0.0)
    core.schedule(0.0)
    assert dispatched(take(core)) == []              # no gpus on worker 1
    core.worker_joined(2, info(gpus=1, host="h2"), 0.0)
    core.schedule(0.0)
    assert dispatched(take(core)) == [(2, a.id)]
    assert b.state == "ready"


def test_too_big_task_waits_and_warns_once(core):
    t = submit(core, new_task(cores=4))
    core.worker_joined(1, INFO, 0.0)
    for _ in range(3):
        assert core.schedule(0.0) == 0
    cmds = take(core)
    assert dispatched(cmds) == []
    warnings = logs(cmds, "warning")
    assert len(warnings) == 1 and warnings[0]["task"] == t.id
    assert "large enough" in warnings[0]["reason"]
    assert t.state == "ready"


def test_too_big_task_runs_when_big_worker_joins(core):
    t = submit(core, new_task(cores=4))
    core.worker_joined(1, INFO, 0.0)
    core.schedule(0.0)
    core.worker_joined(2, info(cores=8, host="big"), 0.0)
    core.schedule(0.0)
    assert dispatched(take(core)) == [(2, t.id)]


def test_big_task_does_not_block_smaller_ones(core):
    big = submit(core, new_task(cores=4))
    small = submit(core, new_task())
    core.worker_joined(1, INFO, 0.0)
    core.schedule(0.0)
    assert dispatched(take(core)) == [(1, small.id)]
    assert core.ready[0] == big.id                    # still first in line


# ---------------------------------------------------------------- worker loss
def test_worker_loss_requeues_at_front(core):
    ts = [submit(core, new_task()) for _ in range(4)]
    core.worker_joined(1, INFO, 0.0)
    core.schedule(0.0)
    take(core)
    core.worker_lost(1, "connection reset", 1.0)
    assert list(core.ready) == [t.id for t in ts]
    assert all(t.state == "ready" for t in ts)
    assert sorted(r["task"] for r in logs(take(core), "requeued")) == [ts[0].id, ts[1].id]
    assert core.stats()["running"] == 0


def test_worker_loss_requeued_tasks_run_elsewhere(core):
    ts = [submit(core, new_task()) for _ in range(3)]
    core.worker_joined(1, INFO, 0.0)
    core.schedule(0.0)
    take(core)
    core.worker_lost(1, "gone", 1.0)
    core.worker_joined(2, info(cores=1, host="h2"), 1.0)
    core.schedule(1.0)
    assert dispatched(take(core)) == [(2, ts[0].id)]
    assert ts[0].attempts == 2


def test_worker_loss_does_not_spend_retries(core):
    t = submit(core, new_task(retries=1))
    core.worker_joined(1, INFO, 0.0)
    core.schedule(0.0)
    core.worker_lost(1, "gone", 1.0)
    core.worker_joined(2, INFO, 1.0)
    core.schedule(1.0)
    take(core)
    assert fail(core, 2, t) is None                  # the one retry is still there
    core.schedule(1.0)
    assert dispatched(take(core)) == [(2, t.id)]


def test_worker_loss_of_unknown_worker_is_ignored(core):
    core.worker_lost(42, "never joined", 0.0)
    assert take(core) == []


def test_stale_result_from_lost_worker_ignored(core):
    t = submit(core, new_task())
    core.worker_joined(1, INFO, 0.0)
    core.schedule(0.0)
    core.worker_lost(1, "gone", 1.0)
    core.worker_joined(2, INFO, 1.0)
    core.schedule(1.0)
    take(core)
    assert ok(core, 1, t) is None
    cmds = take(core)
    assert done(cmds) == [] and len(logs(cmds, "stale result")) == 1
    assert t.state == "running" and t._wid == 2
    assert ok(core, 2, t) is t
    assert done(take(core)) == [t] and t.worker == 2


def test_result_for_unknown_task_is_stale(core):
    core.worker_joined(1, INFO, 0.0)
    core.task_done(1, 999, {"status": "success"}, 0.0)
    assert len(logs(take(core), "stale result")) == 1


# ---------------------------------------------------------------- retries and results
def test_success_returns_task_with_worker_details(core):
    t = submit(core, new_task())
    core.worker_joined(1, INFO, 0.0)
    core.schedule(0.0)
    take(core)
    ok(core, 1, t, stdout="hi\n", wall=0.5)
    assert done(take(core)) == [t]
    assert t.successful() and t.hostname == "h1" and t.worker == 1
    assert t.std_output == "hi\n" and t.wall_time == 0.5 and t.attempts == 1
    assert core.stats()["done"] == 1


def test_nonzero_exit_is_a_failure_with_its_exit_code(core):
    t = submit(core, new_task())
    core.worker_joined(1, INFO, 0.0)
    core.schedule(0.0)
    take(core)
    core.task_done(1, t.id, {"status": "failed", "exit_code": 3, "reason": "exit code 3", "wall": 0.01}, 0.0)
    assert done(take(core)) == [t]
    assert t.result == "failed" and t.exit_code == 3 and t.reason == "exit code 3" and not t.successful()
    assert core.stats()["failed"] == 1


def test_retries_then_failed_with_reason(core):
    t = submit(core, new_task(retries=2))
    core.worker_joined(1, INFO, 0.0)
    n_dispatch = 0
    for attempt in range(3):
        core.schedule(0.0)
        cmds = take(core)
        assert dispatched(cmds) == [(1, t.id)]
        n_dispatch += 1
        back = fail(core, 1, t, reason="boom %d" % attempt)
        if attempt < 2:
            assert back is None and done(take(core)) == []
    cmds = take(core)
    assert done(cmds) == [t]
    assert n_dispatch == 3 and t.attempts == 3
    assert t.result == "failed" and t.reason == "boom 2"
    assert core.schedule(0.0) == 0


# ---------------------------------------------------------------- files
def test_cached_file_put_once_per_worker(core, infile):
    f = infile(cache=True)
    a = submit(core, new_task().add_input(f, "in"))
    b = submit(core, new_task().add_input(f, "in"))
    core.worker_joined(1, INFO, 0.0)
    core.schedule(0.0)
    cmds = take(core)
    assert [(c[1], c[2], c[3]) for c in of(cmds, "put")] == [(1, f, "file-%d" % f.id)]
    assert dispatched(cmds) == [(1, a.id), (1, b.id)]
    # the put is queued before the task that needs it
    assert cmds.index(of(cmds, "put")[0]) < cmds.index(of(cmds, "task")[0])


def test_cached_file_not_put_again_for_later_task(core, infile):
    f = infile(cache=True)
    a = submit(core, new_task().add_input(f, "in"))
    core.worker_joined(1, INFO, 0.0)
    core.schedule(0.0)
    take(core)
    ok(core, 1, a, wall=1.0)
    submit(core, new_task().add_input(f, "in"))
    core.schedule(0.0)
    cmds = take(core)
    assert len(dispatched(cmds)) == 1 and of(cmds, "put") == []


def test_cached_file_put_to_each_worker(core, infile):
    f = infile(cache=True)
    submit(core, new_task(cores=2).add_input(f, "in"))
    submit(core, new_task(cores=2).add_input(f, "in"))
    core.worker_joined(1, INFO, 0.0)
    core.worker_joined(2, info(host="h2"), 0.0)
    core.schedule(0.0)
    assert sorted(c[1] for c in of(take(core), "put")) == [1, 2]


def test_task_level_file_put_again(core, infile):
    f = infile(cache=False)
    a = submit(core, new_task().add_input(f, "in"))
    core.worker_joined(1, INFO, 0.0)
    core.schedule(0.0)
    assert len(of(take(core), "put")) == 1
    ok(core, 1, a, wall=1.0)
    submit(core, new_task().add_input(f, "in"))
    core.schedule(0.0)
    assert len(of(take(core), "put")) == 1


def test_file_reported_cached_at_join_not_put(core, infile):
    f = infile(cache=True)
    submit(core, new_task().add_input(f, "in"))
    core.worker_joined(1, info(cached=["file-%d" % f.id]), 0.0)
    core.schedule(0.0)
    cmds = take(core)
    assert len(dispatched(cmds)) == 1 and of(cmds, "put") == []


def test_unreadable_input_returned_as_input_missing(tmp_path):
    p = tmp_path / "gone.txt"
    p.write_text("x")
    f = File(str(p), True)

    def names(f):
        raise FileNotFoundError(2, "No such file", f.source)

    core = Core(names=names)
    t = submit(core, new_task().add_input(f, "in"))
    core.worker_joined(1, INFO, 0.0)
    core.schedule(0.0)
    cmds = take(core)
    assert dispatched(cmds) == [] and done(cmds) == [t]
    assert t.result == "input missing" and str(p) in t.reason


def test_python_function_sent_once_per_worker(core):
    a = submit(core, PythonTask(divmod, 7, 2))
    b = submit(core, PythonTask(divmod, 9, 2))
    core.worker_joined(1, INFO, 0.0)
    core.schedule(0.0)
    cmds = take(core)
    fns = of(cmds, "fn")
    assert len(fns) == 1 and fns[0][1] == 1 and fns[0][2] == a._fid and fns[0][3] == a._fbytes
    assert cmds.index(fns[0]) < cmds.index(of(cmds, "task")[0])
    assert dispatched(cmds) == [(1, a.id), (1, b.id)]


# ---------------------------------------------------------------- temps
def producer_consumer(core):
    t = Temp()
    p = submit(core, new_task("make").add_output(t, "out"))
    c = submit(core, new_task("use").add_input(t, "in"))
    return t, p, c


def test_temp_consumer_waits_for_producer(core):
    t, p, c = producer_consumer(core)
    core.worker_joined(1, INFO, 0.0)
    core.schedule(0.0)
    assert dispatched(take(core)) == [(1, p.id)]
    assert c.state == "waiting"


def test_temp_consumer_runs_where_temp_is(core):
    t, p, c = producer_consumer(core)
    core.worker_joined(1, INFO, 0.0)
    core.schedule(0.0)
    take(core)
    other = submit(core, new_task())                 # keeps worker 1 busier than worker 2
    core.schedule(0.0)
    assert dispatched(take(core)) == [(1, other.id)]
    core.worker_joined(2, info(host="h2"), 0.0)
    ok(core, 1, p, temps=[t.cachename()])
    assert c.state == "ready"
    core.schedule(0.0)
    cmds = take(core)
    assert dispatched(cmds) == [(1, c.id)]
    assert of(cmds, "put") == [] and of(cmds, "get") == []
    assert other.state == "running"


def test_temp_fetched_via_manager_when_holder_is_full(core):
    t, p, c = producer_consumer(core)
    core.worker_joined(1, info(cores=1), 0.0)
    core.schedule(0.0)
    take(core)
    blocker = submit(core, new_task())               # queued ahead of the consumer
    ok(core, 1, p, temps=[t.cachename()], wall=1.0)
    core.schedule(0.0)
    assert dispatched(take(core)) == [(1, blocker.id)]
    core.worker_joined(2, info(host="h2"), 0.0)
    core.schedule(0.0)
    cmds = take(core)
    assert dispatched(cmds) == [] and of(cmds, "get") == [("get", 1, t.cachename())]
    core.schedule(0.0)
    assert of(take(core), "get") == []               # one fetch at a time
    core.file_fetched(t.cachename(), "/manager/copy")
    core.schedule(0.0)
    cmds = take(core)
    assert dispatched(cmds) == [(2, c.id)]
    assert [(x[1], x[3]) for x in of(cmds, "put")] == [(2, t.cachename())]


def test_temp_lost_reruns_producer_for_new_consumer(core):
    t = Temp()
    p = submit(core, new_task("make").add_output(t, "out"))
    core.worker_joined(1, INFO, 0.0)
    core.schedule(0.0)
    ok(core, 1, p, temps=[t.cachename()])
    assert done(take(core)) == [p]
    core.worker_lost(1, "gone", 1.0)
    core.worker_joined(2, info(host="h2"), 1.0)
    c = submit(core, new_task("use").add_input(t, "in"), 1.0)
    assert c.state == "waiting"
    core.schedule(1.0)
    cmds = take(core)
    [(wid, rid)] = dispatched(cmds)
    assert wid == 2 and rid < 0
    rec = of(cmds, "task")[0][2]
    assert rec.command == "make" and rec is not p and p.id > 0
    assert logs(cmds, "recreate")[0]["task"] == p.id
    ok(core, 2, rec, temps=[t.cachename()])
    cmds = take(core)
    assert done(cmds) == []                          # the recovery task is not shown to the user
    core.schedule(1.0)
    assert dispatched(take(core)) == [(2, c.id)]
    ok(core, 2, c)
    assert done(take(core)) == [c]


def test_temp_lost_with_running_consumer_reruns_producer(core):
    t, p, c = producer_consumer(core)
    core.worker_joined(1, INFO, 0.0)
    core.schedule(0.0)
    take(core)
    ok(core, 1, p, temps=[t.cachename()])
    core.schedule(0.0)
    assert dispatched(take(core)) == [(1, c.id)]
    core.worker_lost(1, "gone", 1.0)                 # consumer and the only copy of the temp die
    core.worker_joined(2, info(host="h2"), 1.0)
    core.schedule(1.0)
    recovery = [tid for _, tid in dispatched(take(core))]
    assert len(recovery) == 1 and recovery[0] < 0


def test_temp_lost_with_ready_consumer_reruns_producer(core):
    t, p, c = producer_consumer(core)
    core.worker_joined(1, info(cores=1), 0.0)
    core.schedule(0.0)
    blocker = submit(core, new_task())
    ok(core, 1, p, temps=[t.cachename()], wall=1.0)
    take(core)
    assert c.state == "ready"
    core.worker_lost(1, "gone", 1.0)
    core.worker_joined(2, info(host="h2"), 1.0)
    core.schedule(1.0)
    assert any(tid < 0 for _, tid in dispatched(take(core)))
    assert blocker.state == "running"


def test_consumer_of_failed_producer_is_input_missing(core):
    t, p, c = producer_consumer(core)
    core.worker_joined(1, INFO, 0.0)
    core.schedule(0.0)
    take(core)
    fail(core, 1, p, reason="exit code 2")
    cmds = take(core)
    assert set(done(cmds)) == {p, c}
    assert p.result == "failed"
    assert c.result == "input missing" and "not produced" in c.reason and "exit code 2" in c.reason
    core.schedule(0.0)
    assert dispatched(take(core)) == []


def test_late_consumer_of_failed_producer_is_input_missing(core):
    t = Temp()
    p = submit(core, new_task("make").add_output(t, "out"))
    core.worker_joined(1, INFO, 0.0)
    core.schedule(0.0)
    fail(core, 1, p)
    take(core)
    c = submit(core, new_task("use").add_input(t, "in"))
    assert done(take(core)) == [c] and c.result == "input missing"


def test_file_output_consumer_waits_for_producer(core, infile):
    f = infile(cache=True, name="made.txt")
    p = submit(core, new_task("make").add_output(f, "out"))
    c = submit(core, new_task("use").add_input(f, "in"))
    core.worker_joined(1, INFO, 0.0)
    core.schedule(0.0)
    assert dispatched(take(core)) == [(1, p.id)]
    ok(core, 1, p)
    core.schedule(0.0)
    assert dispatched(take(core)) == [(1, c.id)]


# ---------------------------------------------------------------- cancel
def test_cancel_waiting_task(core):
    t = submit(core, new_task())
    assert core.cancel(t.id) is True
    cmds = take(core)
    assert done(cmds) == [t] and of(cmds, "kill") == []
    assert t.result == "cancelled"
    core.worker_joined(1, INFO, 0.0)
    assert core.schedule(0.0) == 0


def test_cancel_running_task_kills_it_and_frees_the_core(core):
    a = submit(core, new_task(cores=2))
    b = submit(core, new_task(cores=2))
    core.worker_joined(1, INFO, 0.0)
    core.schedule(0.0)
    take(core)
    assert core.cancel(a.id)
    cmds = take(core)
    assert of(cmds, "kill") == [("kill", 1, a.id)]
    assert done(cmds) == [a] and a.result == "cancelled"
    core.schedule(0.0)
    assert dispatched(take(core)) == [(1, b.id)]
    assert ok(core, 1, a) is None                    # its late result is stale
    assert core.stats()["running"] == 1


def test_cancel_unknown_task(core):
    assert core.cancel(12345) is False


# ---------------------------------------------------------------- policies
def test_files_policy_prefers_worker_with_input_cached(core, infile):
    f = infile(cache=True)
    core.worker_joined(1, INFO, 0.0)                 # first: wins ties
    core.worker_joined(2, info(host="h2", cached=["file-%d" % f.id]), 0.0)
    t = submit(core, new_task().add_input(f, "in"))
    core.schedule(0.0)
    assert dispatched(take(core)) == [(2, t.id)]


@pytest.mark.parametrize("policy, expected", [("files", 1), ("fcfs", 2)],
                         ids=["files_prefers_cached_over_less_loaded", "fcfs_spreads_to_least_loaded"])
def test_policy_with_a_cached_input_on_a_busy_worker(infile, policy, expected):
    core = make_core(policy)
    f = infile(cache=True)
    core.worker_joined(1, info(host="h1", cached=["file-%d" % f.id]), 0.0)
    core.worker_joined(2, info(host="h2"), 0.0)
    busy = submit(core, new_task())
    core.schedule(0.0)
    assert dispatched(take(core)) == [(1, busy.id)]
    t = submit(core, new_task().add_input(f, "in"))
    core.schedule(0.0)
    assert dispatched(take(core)) == [(expected, t.id)]


def test_fcfs_policy_alternates_workers():
    core = make_core("fcfs")
    core.worker_joined(1, INFO, 0.0)
    core.worker_joined(2, info(host="h2"), 0.0)
    for _ in range(4):
        submit(core, new_task())
    core.schedule(0.0)
    assert [w for w, _ in dispatched(take(core))] == [1, 2, 1, 2]


def test_unknown_policy_named_in_error():
    with pytest.raises(ValueError, match="unknown scheduler 'nope'"):
        Core(policy="nope")
