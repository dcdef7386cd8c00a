"""The manager core as a state machine: events in, commands out.

No sockets, no threads, no clock: a Sim feeds events to `Core.handle` (fake workers join
with a resource dict, tasks are prepared as Manager.submit prepares them) and the tests read
the typed commands that come out.
"""
import itertools

import pytest

from vinehpc.core import Core, InvalidTransition, TaskState, TRANSITIONS, input_names
from vinehpc.core import placement
from vinehpc.core.commands import KillTask, SendTask, TaskFinished
from vinehpc.core.commands import TaskStarted
from vinehpc.core.events import SCHEDULE, Cancel, Submit, TaskResult, WorkerJoined, WorkerLost
from vinehpc.core.tasks import transition
from vinehpc.file import File
from vinehpc.task import PythonTask, Task

INFO = {"cores": 2, "memory": 1000, "disk": 1000, "gpus": 0, "host": "h1"}
_ids = itertools.count(1)


def info(**kw):
    d = dict(INFO)
    d.update(kw)
    return d


class Sim:
    """A Core and the commands it returned since the last take()."""

    def __init__(self, policy="files"):
        self.core = Core(policy=policy)
        self.cmds = []

    def __call__(self, event, now=0.0):
        out = self.core.handle(event, now)
        self.cmds.extend(out)
        return out

    def take(self):
        out, self.cmds = self.cmds, []
        return out

    # events
    def submit(self, task, now=0.0, **kw):
        """What Manager.submit does before posting the task to the core."""
        task._check()
        inputs = input_names(task)
        task.id = next(_ids)
        for f, _ in task.outputs:
            f.producer = task.id
        task.state = "submitted"
        self(Submit(task, inputs, **kw), now)
        return task

    def join(self, wid, now=0.0, **kw):
        return self(WorkerJoined(wid, info(**kw)), now)

    def schedule(self, now=0.0) -> int:
        return len(of(self.pass_(now), SendTask))

    def pass_(self, now=0.0) -> list:
        """One scheduling pass: its commands."""
        return self(SCHEDULE, now)

    def result(self, wid, task, now=0.0, **res):
        ts = self.core.tasks.get(task.id)
        if "att" not in res and ts is not None and ts.attempts > 1:
            res["att"] = ts.attempts        # (as a worker echoes the task message's)
        return self(TaskResult(wid, task.id, res), now)

    def ok(self, wid, task, now=0.0, **extra):
        res = {"status": "success", "exit_code": 0, "wall": 0.01}
        res.update(extra)
        return self.result(wid, task, now, **res)

    def fail(self, wid, task, reason="exit code 1", now=0.0):
        return self.result(wid, task, now, status="failed", exit_code=1, reason=reason, wall=0.01)

    # the core's view of a task
    def ts(self, task) -> TaskState:
        return self.core.tasks[task.id]

    def state(self, task) -> str:
        ts = self.core.tasks.get(task.id)
        return "done" if ts is None else ts.state


def new_task(cmd="true", **res):
    t = Task(cmd)
    for k, v in res.items():
        getattr(t, "set_" + k)(v)
    return t


def of(cmds, kind):
    return [c for c in cmds if type(c) is kind]


def dispatched(cmds):
    """[(wid, tid)] of the SendTask commands."""
    return [(c.wid, c.tid) for c in of(cmds, SendTask)]


def logs(cmds, event):
    return [c for c in of(cmds, dict) if c["event"] == event]


def done(cmds):
    return [c.task for c in of(cmds, TaskFinished)]


@pytest.fixture
def sim():
    return Sim()


def infile_factory(tmp_path):
    """make() -> a real file on the manager side (named by its content at submit, as Manager.submit does)."""
    def make(cache=True, name="in.txt", data="data"):
        p = tmp_path / name
        p.write_text(data)
        return File(str(p), cache)
    return make


@pytest.fixture
def infile(tmp_path):
    return infile_factory(tmp_path)


# ---------------------------------------------------------------- the transition table
def test_every_state_but_done_can_end_and_done_is_final():
    assert all("done" in TRANSITIONS[s] for s in TRANSITIONS if s != "done") and TRANSITIONS["done"] == ()


@pytest.mark.parametrize("frm, to", [("new", "running"), ("waiting", "running"), ("running", "waiting"),
                                     ("done", "ready"), ("done", "done")])
def test_an_illegal_transition_raises(frm, to):
    ts = TaskState(new_task(), [], {})
    ts.state = frm
    with pytest.raises(InvalidTransition, match="%s -> %s" % (frm, to)):
        transition(ts, to)


def test_results_reach_the_users_task_only_when_it_is_returned(sim):
    t = sim.submit(new_task())
    sim.join(1)
    sim.schedule()
    assert t.state == "submitted" and t.attempts == 0 and sim.state(t) == "running"
    sim.ok(1, t, stdout="hi\n", wall=0.5)
    assert done(sim.take()) == [t]
    assert t.state == "done" and t.successful() and t.hostname == "h1" and t.worker == 1
    assert t.std_output == "hi\n" and t.wall_time == 0.5 and t.attempts == 1
    assert t.resources_allocated == {"cores": 1}
    assert sim.core.stats()["done"] == 1 and not vars(t).keys() & {"_res", "_wid", "_whole", "_tries"}


# ---------------------------------------------------------------- packing
def test_worker_runs_as_many_tasks_as_cores(sim):
    ts = [sim.submit(new_task()) for _ in range(5)]
    sim.join(1)
    assert sim.schedule() == 2
    assert dispatched(sim.take()) == [(1, ts[0].id), (1, ts[1].id)]
    assert sim.schedule() == 0


def test_finished_task_frees_its_core(sim):
    ts = [sim.submit(new_task()) for _ in range(3)]
    sim.join(1)
    sim.schedule()
    sim.take()
    sim.ok(1, ts[0], wall=1.0)
    sim.schedule()
    assert dispatched(sim.take()) == [(1, ts[2].id)]


def test_multicore_task_takes_its_cores(sim):
    big = sim.submit(new_task(cores=2))
    small = sim.submit(new_task())
    sim.join(1)
    sim.schedule()
    assert dispatched(sim.take()) == [(1, big.id)]
    assert sim.state(small) == "ready"


def _run_fast(sim, wid, n, category="default", wall=0.01):
    """Run n tasks of a category to completion on worker wid, one schedule at a time."""
    for _ in range(n):
        t = sim.submit(new_task(category=category))
        sim.schedule()
        assert dispatched(sim.take()) == [(wid, t.id)]
        sim.ok(wid, t, wall=wall)
        sim.take()


def test_prefetch_after_fast_tasks_up_to_twice_cores(sim):
    sim.join(1)
    _run_fast(sim, 1, placement.SHORT_SAMPLES)
    for _ in range(6):
        sim.submit(new_task())
    assert sim.schedule() == 2 * INFO["cores"]


def test_short_tasks_are_sent_pipelined(sim):
    sim.join(1)
    t = sim.submit(new_task())
    sim.schedule()
    assert "pipe" not in of(sim.take(), SendTask)[0].spec
    sim.ok(1, t)
    _run_fast(sim, 1, placement.SHORT_SAMPLES - 1)
    for _ in range(INFO["cores"] + 1):
        sim.submit(new_task())
    sim.schedule()
    # those the worker has room for start as they arrive; the one beyond its cores is sent ahead
    assert [c.spec.get("pipe") for c in of(sim.take(), SendTask)] == [None] * INFO["cores"] + [True]


def test_no_prefetch_before_enough_samples(sim):
    sim.join(1)
    _run_fast(sim, 1, placement.SHORT_SAMPLES - 1)
    for _ in range(6):
        sim.submit(new_task())
    assert sim.schedule() == INFO["cores"]


def test_no_prefetch_for_slow_category(sim):
    sim.join(1)
    _run_fast(sim, 1, placement.SHORT_SAMPLES, wall=1.0)
    for _ in range(6):
        sim.submit(new_task())
    assert sim.schedule() == INFO["cores"]


def test_prefetch_is_per_category(sim):
    sim.join(1)
    _run_fast(sim, 1, placement.SHORT_SAMPLES, category="fast")
    for _ in range(6):
        sim.submit(new_task(category="slow"))
    assert sim.schedule() == INFO["cores"]


def test_memory_packing(sim):
    a = sim.submit(new_task(memory=600))
    b = sim.submit(new_task(memory=600))
    c = sim.submit(new_task(memory=400))
    sim.join(1)
    sim.schedule()
    # a fits, b does not (1200 > 1000) and waits; c fills the rest
    assert dispatched(sim.take()) == [(1, a.id), (1, c.id)]
    assert sim.state(b) == "ready"


def test_a_big_task_lets_small_ones_pass_for_a_while_then_a_worker_is_kept_for_it(sim):
    """Backfill without starvation: small tasks keep both workers full; the big one waits
    RESERVE_AFTER seconds, then one worker takes nothing new until the big task starts there,
    while the other keeps taking small tasks."""
    sim.join(1)
    sim.join(2, host="h2")
    small = [sim.submit(new_task(memory=500)) for _ in range(4)]
    sim.schedule()
    running = dict((tid, wid) for wid, tid in dispatched(sim.take()))
    assert len(running) == 4
    big = sim.submit(new_task(memory=900))
    more = [sim.submit(new_task(memory=500)) for _ in range(6)]
    by_id = {t.id: t for t in small + more}
    started = []

    def finish_one(now):
        tid = min(running)                # the oldest running task ends
        sim.ok(running.pop(tid), by_id[tid], now=now)
        sim.schedule(now)
        cmds = sim.take()
        for w, t in dispatched(cmds):
            running[t] = w
            started.append((w, t))
        return logs(cmds, "reserved")

    finish_one(0.5)                       # within the patience: a small task takes the room
    assert sim.state(big) == "ready" and len(running) == 4
    now = placement.RESERVE_AFTER + 1.0
    del started[:]
    recs = finish_one(now)                # the patience is over: a worker is kept for the big task
    assert sim.core.reserved is not None and sim.core.reserved[1] == big.id
    kept = sim.core.reserved[0]
    assert recs and recs[0]["task"] == big.id and recs[0]["worker"] == kept
    while sim.state(big) == "ready" and running:
        now += 0.1
        finish_one(now)
    assert sim.state(big) == "running" and sim.ts(big).wid == kept and sim.core.reserved is None
    before_big = started[:started.index((kept, big.id))]
    assert before_big and all(w != kept for w, _ in before_big)   # the other worker kept backfilling
    assert len(running) >= 2


def test_disk_packing(sim):
    a = sim.submit(new_task(disk=700))
    b = sim.submit(new_task(disk=700))
    sim.join(1)
    sim.schedule()
    assert dispatched(sim.take()) == [(1, a.id)]
    sim.ok(1, a, wall=1.0)
    sim.schedule()
    assert dispatched(sim.take()) == [(1, b.id)]


def test_gpu_packing(sim):
    a = sim.submit(new_task(gpus=1))
    b = sim.submit(new_task(gpus=1))
    sim.join(1, gpus=0)
    sim.schedule()
    assert dispatched(sim.take()) == []              # no gpus on worker 1
    sim.join(2, gpus=1, host="h2")
    sim.schedule()
    assert dispatched(sim.take()) == [(2, a.id)]
    assert sim.state(b) == "ready"


def test_too_big_task_waits_and_warns_once(sim):
    t = sim.submit(new_task(cores=4))
    sim.join(1)
    for _ in range(3):
        assert sim.schedule() == 0
    cmds = sim.take()
    assert dispatched(cmds) == []
    warnings = logs(cmds, "warning")
    assert len(warnings) == 1 and warnings[0]["task"] == t.id
    assert "large enough" in warnings[0]["reason"]
    assert sim.state(t) == "ready"


def test_too_big_task_runs_when_big_worker_joins(sim):
    t = sim.submit(new_task(cores=4))
    sim.join(1)
    sim.schedule()
    sim.join(2, cores=8, host="big")
    sim.schedule()
    assert dispatched(sim.take()) == [(2, t.id)]


def test_big_task_does_not_block_smaller_ones(sim):
    big = sim.submit(new_task(cores=4))
    small = sim.submit(new_task())
    sim.join(1)
    sim.schedule()
    assert dispatched(sim.take()) == [(1, small.id)]
    assert sim.core.ready[0] == big.id                # still first in line


def test_every_too_big_task_is_warned_about_once(sim):
    ts = [sim.submit(new_task(cores=4)) for _ in range(3)]
    sim.join(1)
    for _ in range(2):
        sim.schedule()
    assert sorted(w["task"] for w in logs(sim.take(), "warning")) == [t.id for t in ts]


def _count_fits(monkeypatch):
    calls = []
    real = placement._fits
    monkeypatch.setattr(placement, "_fits", lambda *a: calls.append(1) or real(*a))
    return calls


def test_a_pass_skips_full_workers_without_trying_the_queue(sim, monkeypatch):
    """Thousands of queued tasks behind full workers: a pass looks at no worker for them."""
    sim.join(1, cores=1)
    sim.join(2, cores=1)
    tasks = [sim.submit(new_task()) for _ in range(1000)]
    first = dict((tid, wid) for wid, tid in dispatched(sim.pass_()))
    assert sorted(first) == [tasks[0].id, tasks[1].id]
    calls = _count_fits(monkeypatch)
    assert sim.schedule() == 0
    assert calls == []
    sim.ok(first[tasks[0].id], tasks[0])
    assert dispatched(sim.pass_()) == [(first[tasks[0].id], tasks[2].id)]     # room again: the next one goes


def test_tasks_of_a_shape_that_fit_nowhere_are_tried_once_per_pass(sim, monkeypatch):
    """Cores free but memory full: the first of 200 alike tasks is tried on each worker, the
    others are passed over as its shape; a smaller task behind them still starts (backfill)."""
    sim.join(1, cores=8, memory=1000)
    first = sim.submit(new_task(memory=900))
    for _ in range(200):
        sim.submit(new_task(memory=600))
    small = sim.submit(new_task(memory=50))
    calls = _count_fits(monkeypatch)
    assert dispatched(sim.take() + sim.pass_()) == [(1, first.id), (1, small.id)]
    assert len(calls) == 3


@pytest.mark.parametrize("policy", ["files", "fcfs"])
def test_a_dispatch_tries_a_bounded_number_of_workers_whatever_the_fleet(monkeypatch, policy):
    """Issue 15: each dispatch tried every worker with room (and the policy looked at each), so
    per-task work grew with the fleet.  Workers are indexed by load: the same tasks cost the same
    number of fit checks among 100 workers as among 2,000 (least loaded first, so one each)."""
    counts = {}
    for n in (100, 2000):
        sim = Sim(policy)
        for wid in range(1, n + 1):
            sim.join(wid, cores=4, host="h%d" % wid)
        tasks = [sim.submit(new_task()) for _ in range(200)]
        calls = _count_fits(monkeypatch)
        sim.take()
        got = dispatched(sim.pass_())
        assert len(got) == 200
        for (wid, tid), t in zip(got[:50], tasks):      # and finishing some moves the next ones there
            sim.ok(wid, t)
        more = [sim.submit(new_task()) for _ in range(50)]
        sim.take()
        again = dispatched(sim.pass_())
        assert sorted(tid for _, tid in again) == sorted(t.id for t in more)
        counts[n] = len(calls)
    assert counts[2000] == counts[100] == 250


def test_a_queued_task_costs_the_core_little_memory():
    """Issue 15: a million queued tasks, at most 1 KB each of manager memory.  The core's share
    (its TaskState, resources, queue and table entries) counted by tracemalloc: each queued task
    carried two empty sets of its own (432 bytes) besides; now about 500 bytes in all."""
    import gc
    import tracemalloc
    core = Core()
    tasks = []
    for i in range(5000):
        t = new_task("echo %d" % i)
        t.id, t.state = 10 ** 7 + i, "submitted"
        tasks.append((t, input_names(t)))
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for t, inputs in tasks:
            core.handle(Submit(t, inputs), 0.0)
        gc.collect()
        per_task = (tracemalloc.get_traced_memory()[0] - before) / len(tasks)
    finally:
        tracemalloc.stop()
    assert len(core.ready) == 5000
    assert per_task < 650, per_task
    assert input_names(new_task()) is input_names(new_task())     # no inputs: one shared empty tuple, not a list each


def test_files_looks_at_the_workers_holding_the_inputs_not_at_every_worker(monkeypatch, infile):
    """The "files" policy with inputs: the workers holding them come from the index of where each
    cached file is; the others are not tried (the least loaded one only when no holder fits)."""
    sim = Sim("files")
    f = infile()
    for wid in range(1, 2001):
        sim.join(wid, cores=1, host="h%d" % wid, cached=[f.cachename()] if wid in (700, 1500) else [])
    calls = _count_fits(monkeypatch)
    a, b, c = (sim.submit(new_task().add_input(f, "in")) for _ in range(3))
    assert dispatched(sim.take() + sim.pass_()) == [(700, a.id), (1500, b.id), (1, c.id)]
    assert len(calls) <= 2 + 2 + 3       # the two holders each time, then the least loaded
    sim(WorkerLost(700, "gone"))
    assert sim.core.where[f.cachename()] == {1, 1500}    # worker 1 got it with task c; 700 left the index


@pytest.mark.parametrize("policy", ["files", "fcfs"])
def test_the_load_index_chooses_as_the_policy_over_every_candidate(policy):
    """The indexes (workers by load, where each cached file is) find the very worker choose() would
    among all candidates (the most input bytes held, then the fewest outstanding, the longest at that load
    among equals), through joins, losses, results, inputs, bigger tasks and prefetch."""
    import random
    from vinehpc.file import Buffer

    inputs = [Buffer(b"input %d" % i, cache="workflow") for i in range(6)]

    class Blind(type(Sim(policy).core.policy)):
        least_loaded = None                 # no index: choose() over the full candidate list
        prefers_holders = False

    def play(sim):
        rnd = random.Random(7)
        running, out = {}, []
        wids = iter(range(1, 10 ** 6))
        for step in range(400):
            r = rnd.random()
            if r < 0.05:
                sim.join(next(wids), cores=rnd.choice([1, 2, 4]), memory=rnd.choice([500, 1000]))
            elif r < 0.07 and sim.core.workers:
                wid = rnd.choice(sorted(sim.core.workers))
                sim(WorkerLost(wid, "gone"), step)
                running = {t: w for t, w in running.items() if w != wid}
            elif r < 0.5:
                mem = rnd.choice([None, 300, 600])
                t = new_task(cores=rnd.choice([1, 1, 1, 2]), **({"memory": mem} if mem else {}))
                for f in rnd.sample(inputs, rnd.choice([0, 0, 1, 2])):
                    t.add_input(f, "in%d" % inputs.index(f))
                sim.submit(t, step)
            elif running:
                tid = rnd.choice(sorted(running))
                sim.ok(running.pop(tid), type("T", (), {"id": tid})(), step, wall=rnd.choice([0.001, 0.2]))
            got = dispatched(sim.take() + sim.pass_(step))
            running.update((tid, wid) for wid, tid in got)
            out.append(got)
        return out

    global _ids
    first = _ids
    _ids = itertools.count(10 ** 6)
    fast = play(Sim(policy))
    _ids = itertools.count(10 ** 6)
    blind = Sim(policy)
    blind.core.policy = Blind()
    slow = play(blind)
    _ids = first
    assert sum(map(len, fast)) > 100
    assert fast == slow


def test_a_pinned_task_runs_only_on_its_worker_and_fails_when_it_is_gone(sim):
    sim.join(1)
    sim.join(2, host="h2")
    t = sim.submit(new_task(), pin=2)
    sim.schedule()
    assert dispatched(sim.take()) == [(2, t.id)]
    sim(WorkerLost(2, "gone"))
    sim.schedule()
    cmds = sim.take()
    assert dispatched(cmds) == [] and done(cmds) == [t]
    assert t.result == "failed" and "only one this task may run on" in t.reason


def test_on_start_is_asked_for_at_dispatch(sim):
    def cb(task):
        pass
    t = sim.submit(new_task(), on_start=cb)
    quiet = sim.submit(new_task())
    sim.join(1)
    sim.schedule()
    started = of(sim.take(), TaskStarted)
    assert [(c.task, c.on_start) for c in started] == [(t, cb)] and quiet is not t


# ---------------------------------------------------------------- worker loss
def test_worker_loss_requeues_at_front(sim):
    ts = [sim.submit(new_task()) for _ in range(4)]
    sim.join(1)
    sim.schedule()
    sim.take()
    sim(WorkerLost(1, "connection reset"), 1.0)
    assert list(sim.core.ready) == [t.id for t in ts]
    assert all(sim.state(t) == "ready" for t in ts)
    assert sorted(r["task"] for r in logs(sim.take(), "requeued")) == [ts[0].id, ts[1].id]
    assert sim.core.stats()["running"] == 0


def test_worker_loss_requeued_tasks_run_elsewhere(sim):
    ts = [sim.submit(new_task()) for _ in range(3)]
    sim.join(1)
    sim.schedule()
    sim.take()
    sim(WorkerLost(1, "gone"), 1.0)
    sim.join(2, 1.0, cores=1, host="h2")
    sim.schedule(1.0)
    assert dispatched(sim.take()) == [(2, ts[0].id)]
    assert sim.ts(ts[0]).attempts == 2


def test_worker_loss_does_not_spend_retries(sim):
    t = sim.submit(new_task(retries=1))
    sim.join(1)
    sim.schedule()
    sim(WorkerLost(1, "gone"), 1.0)
    sim.join(2, 1.0)
    sim.schedule(1.0)
    sim.take()
    assert done(sim.fail(2, t)) == []                # the one retry is still there
    sim.schedule(1.0)
    assert dispatched(sim.take()) == [(2, t.id)]


def test_worker_loss_of_unknown_worker_is_ignored(sim):
    assert sim(WorkerLost(42, "never joined")) == []


def test_stale_result_from_lost_worker_ignored(sim):
    t = sim.submit(new_task())
    sim.join(1)
    sim.schedule()
    sim(WorkerLost(1, "gone"), 1.0)
    sim.join(2, 1.0)
    sim.schedule(1.0)
    sim.take()
    cmds = sim.ok(1, t)
    assert done(cmds) == [] and len(logs(cmds, "stale result")) == 1
    assert sim.state(t) == "running" and sim.ts(t).wid == 2
    assert done(sim.ok(2, t)) == [t] and t.worker == 2


def test_result_for_unknown_task_is_stale(sim):
    sim.join(1)
    assert len(logs(sim(TaskResult(1, 999, {"status": "success"})), "stale result")) == 1


# ---------------------------------------------------------------- retries and results
def test_nonzero_exit_is_completed_but_not_successful(sim):
    # TaskVine's result: the command ran to its end ("success"), its code is in exit_code
    t = sim.submit(new_task())
    sim.join(1)
    sim.schedule()
    sim.result(1, t, status="failed", exit_code=3, reason="exit code 3", wall=0.01)
    assert done(sim.take()) == [t]
    assert t.result == "success" and t.exit_code == 3 and t.reason == "exit code 3"
    assert t.completed() and not t.successful()
    assert sim.core.stats()["failed"] == 1      # counted (and journaled) as not successful


def test_a_failure_without_an_exit_code_stays_failed(sim):
    t = sim.submit(new_task())
    sim.join(1)
    sim.schedule()
    sim.result(1, t, status="failed", reason="killed by SIGKILL", exit_code=-9, signal="SIGKILL", wall=0.01)
    assert done(sim.take()) == [t]
    assert t.result == "failed" and not t.completed() and not t.successful()


def test_retries_then_failed_with_reason(sim):
    t = sim.submit(new_task(retries=2))
    sim.join(1)
    n_dispatch = 0
    for attempt in range(3):
        sim.schedule()
        assert dispatched(sim.take()) == [(1, t.id)]
        n_dispatch += 1
        back = sim.fail(1, t, reason="boom %d" % attempt)
        if attempt < 2:
            assert done(back) == []
    assert done(back) == [t]
    assert n_dispatch == 3 and t.attempts == 3
    # retries are spent on a non-zero exit too; the last attempt's code is the task's (TaskVine's "success")
    assert t.result == "success" and t.exit_code == 1 and not t.successful() and t.reason == "boom 2"
    assert sim.schedule() == 0


def test_a_python_tasks_result_bytes_reach_the_task(sim):
    t = sim.submit(PythonTask(divmod, 7, 2))
    sim.join(1)
    sim.schedule()
    sim(TaskResult(1, t.id, {"status": "success", "wall": 0.01}, b"pickled"))
    assert t._result == b"pickled"


# ---------------------------------------------------------------- cancel and drain
def test_cancel_waiting_task(sim):
    t = sim.submit(new_task())
    cmds = sim(Cancel(t.id))
    assert done(cmds) == [t] and of(cmds, KillTask) == []
    assert t.result == "cancelled"
    sim.join(1)
    assert sim.schedule() == 0


def test_cancel_running_task_kills_it_and_frees_the_core(sim):
    a = sim.submit(new_task(cores=2))
    b = sim.submit(new_task(cores=2))
    sim.join(1)
    sim.schedule()
    sim.take()
    cmds = sim(Cancel(a.id))
    assert of(cmds, KillTask) == [KillTask(1, a.id)]
    assert done(cmds) == [a] and a.result == "cancelled"
    sim.schedule()
    assert dispatched(sim.take()) == [(1, b.id)]
    assert done(sim.ok(1, a)) == []                  # its late result is stale
    assert sim.core.stats()["running"] == 1


def test_cancel_unknown_task(sim):
    assert sim(Cancel(12345)) == []


def test_drain_starts_nothing_and_ends_when_nothing_runs(sim):
    from vinehpc.core.commands import Drained
    from vinehpc.core.events import Drain
    a = sim.submit(new_task(cores=2))
    b = sim.submit(new_task())
    sim.join(1)
    sim.schedule()
    sim.take()
    sim(Drain(10.0), 1.0)
    sim.ok(1, a, now=2.0)
    cmds = sim(SCHEDULE, 2.0)
    assert dispatched(cmds) == [] and of(cmds, Drained) == [Drained()]
    assert logs(cmds, "drained")[0]["not run"] == 1 and sim.state(b) == "ready"


def test_drain_cuts_what_still_runs_when_the_grace_ends(sim):
    from vinehpc.core.commands import Drained
    from vinehpc.core.events import Drain
    a = sim.submit(new_task())
    sim.join(1)
    sim.schedule()
    sim(Drain(5.0), 1.0)
    assert of(sim(SCHEDULE, 5.9), Drained) == []     # still within the grace
    cmds = sim(SCHEDULE, 6.0)
    # cut, not returned: "not run", back in the queue a draining core never dispatches from
    assert of(cmds, KillTask) == [KillTask(1, a.id)] and done(cmds) == []
    assert "walltime" in logs(cmds, "not run")[0]["reason"] and sim.state(a) == "ready"
    assert logs(cmds, "drained")[0]["cut"] == [a.id] and of(cmds, Drained)
    assert sim(SCHEDULE, 7.0) == []                  # once


# ---------------------------------------------------------------- policies (mock workers)
class MockWorker:
    def __init__(self, wid, outstanding=0, cached=()):
        self.wid, self.outstanding, self.cached = wid, outstanding, set(cached)
        self.since = 0          # (all came to their load at once: ties go to the first candidate)


class MockTS:
    def __init__(self, inputs):
        self.inputs = inputs


def choose(policy, ts, workers):
    from vinehpc.scheduler import make
    return make(policy).choose(ts, workers).wid


def test_files_policy_prefers_the_worker_holding_more_input_bytes():
    ts = MockTS([("a", 100, False), ("b", 10, False)])
    assert choose("files", ts, [MockWorker(1, cached=["b"]), MockWorker(2, cached=["a"])]) == 2


def test_files_policy_counts_a_temp_double():
    ts = MockTS([("big", 100, False), ("t", 60, True)])
    assert choose("files", ts, [MockWorker(1, cached=["big"]), MockWorker(2, cached=["t"])]) == 2


def test_files_policy_ties_go_to_the_least_loaded():
    assert choose("files", MockTS([]), [MockWorker(1, 3), MockWorker(2, 1), MockWorker(3, 2)]) == 2


def test_files_policy_prefers_cached_over_less_loaded():
    ts = MockTS([("a", 1, False)])
    assert choose("files", ts, [MockWorker(1, 5, cached=["a"]), MockWorker(2, 0)]) == 1


def test_fcfs_policy_takes_the_least_loaded_whatever_is_cached():
    ts = MockTS([("a", 1, False)])
    assert choose("fcfs", ts, [MockWorker(1, 5, cached=["a"]), MockWorker(2, 0)]) == 2


def test_fcfs_policy_first_among_equals():
    assert choose("fcfs", MockTS([]), [MockWorker(1), MockWorker(2)]) == 1


def test_fcfs_policy_alternates_workers():
    sim = Sim("fcfs")
    sim.join(1)
    sim.join(2, host="h2")
    for _ in range(4):
        sim.submit(new_task())
    sim.schedule()
    assert [w for w, _ in dispatched(sim.take())] == [1, 2, 1, 2]


def test_unknown_policy_named_in_error():
    with pytest.raises(ValueError, match="unknown scheduler 'nope'"):
        Core(policy="nope")


def test_a_pass_starts_what_the_fleet_has_room_for_bounded_per_worker():
    """Issue 15: a pass started at most 256 tasks, so 600 idle workers got theirs over three loop
    turns (and a large fleet one task a turn each: a message each way per task).  Tasks that
    start no longer count against the scan limit; a pass starts at most STARTS_PER_WORKER a worker."""
    def fleet(workers, cores, tasks):
        sim = Sim("fcfs")
        for wid in range(1, workers + 1):
            sim.join(wid, cores=cores, host="h%d" % wid)
        for _ in range(tasks):
            sim.submit(new_task())
        sim.take()
        return sim
    got = dispatched(fleet(600, 1, 1000).pass_())
    assert sorted(wid for wid, _ in got) == list(range(1, 601))      # one each: every core of the fleet
    big = fleet(10, 100, 2000)
    for _ in range(2):      # and the next pass as many again
        assert len(dispatched(big.pass_())) == max(placement.DISPATCH_LIMIT, placement.STARTS_PER_WORKER * 10)


def test_a_worker_full_of_tasks_sent_ahead_is_refilled_once_half_are_done():
    """Tiny tasks are sent ahead (PREFETCH_FACTOR times a worker's cores).  A full worker came back
    into the index at each result and got one task per pass: one message per task however many it
    held.  Now it comes back once half of what it was sent ahead is done, and gets them in one pass."""
    sim = Sim("fcfs")
    sim.join(1, cores=1)
    sim.join(2, cores=1, host="h2")
    for _ in range(placement.SHORT_SAMPLES):        # the category learns its tasks are tiny
        t = sim.submit(new_task())
        sim.take()
        (wid, _), = dispatched(sim.pass_())
        sim.ok(wid, t, wall=0.001)
    f = placement.PREFETCH_FACTOR
    assert placement._factor(sim.core, "default") == f > 1
    tasks = {t.id: t for t in (sim.submit(new_task()) for _ in range(4 * f))}
    sim.take()
    first = dispatched(sim.pass_())
    assert sorted(w for w, _ in first) == [1] * f + [2] * f                   # both full
    mine = [tid for w, tid in first if w == 1]
    for tid in mine[:f // 2 - 1]:
        sim.ok(1, tasks[tid], wall=0.001)
        assert dispatched(sim.pass_()) == []          # more than half left: not yet
    sim.ok(1, tasks[mine[f // 2 - 1]], wall=0.001)
    again = dispatched(sim.pass_())
    assert [w for w, _ in again] == [1] * (f // 2)    # half done: refilled, all in this pass


def _tiny_fleet(workers):
    """A fleet of one-core workers whose default category has learnt that its tasks are tiny."""
    sim = Sim("fcfs")
    for wid in range(1, workers + 1):
        sim.join(wid, cores=1, host="h%d" % wid)
    for _ in range(placement.SHORT_SAMPLES):
        t = sim.submit(new_task())
        sim.take()
        (wid, _), = dispatched(sim.pass_())
        sim.ok(wid, t, wall=0.001)
    assert sim.core.tiny_out == 0
    return sim


def test_past_the_spread_fleet_tiny_tasks_go_out_in_batches_within_a_budget():
    """Issue 15: on 5,000 one-core workers, tiny tasks went out 2 a core (10,000 out, wait() 0.5 s
    behind them) and a message each way for every task or two.  Past SPREAD_CORES cores at most
    TINY_BUDGET are out, each worker filled with a full batch before the next is taken."""
    n = placement.SPREAD_CORES + 27
    sim = _tiny_fleet(n)
    f, budget = placement.PREFETCH_FACTOR, placement.TINY_BUDGET
    tasks = {t.id: t for t in (sim.submit(new_task()) for _ in range(2 * budget))}
    sim.take()
    out = []
    for _ in range(4):
        out += dispatched(sim.pass_())
    assert len(out) == budget == sim.core.tiny_out          # the budget, not 2 a core of the fleet
    per = {}
    for wid, _ in out:
        per[wid] = per.get(wid, 0) + 1
    assert sorted(per.values()) == [f] * (budget // f)         # whole batches, on as few workers
    assert [tid for _, tid in out] == sorted(tid for _, tid in out)     # in queue order
    waiting = [sim.core.tasks[t] for t in sim.core.ready]
    assert len(waiting) == budget and all(ts.passed_since is None for ts in waiting)   # held, not passed over
    assert sim.core.reserved is None
    # results free the budget: the next tasks in line go out, again as batches
    wid = out[0][0]
    for _, tid in [x for x in out if x[0] == wid]:
        sim.ok(wid, tasks[tid], wall=0.001)
    assert sim.core.tiny_out == budget - f
    again = dispatched(sim.pass_())
    assert len(again) == f and len({w for w, _ in again}) == 1
    assert [tid for _, tid in again] == sorted(tasks)[budget:budget + f]


def test_below_the_spread_fleet_a_pass_fills_one_worker_before_the_next():
    """Issue 15: on 100 one-core workers a pass's starts (4 a worker) went to the least loaded one by
    one, so a queue of tiny tasks went out 4 or 5 a message where 10 workers got 16.  Now a
    worker is filled with its batch before the next is taken, in any fleet; it stays in the index,
    so the same pass can come back to it."""
    n = 100
    assert n < placement.SPREAD_CORES
    sim = _tiny_fleet(n)
    f = placement.PREFETCH_FACTOR
    for _ in range(3 * n * f):
        sim.submit(new_task())
    sim.take()
    out = dispatched(sim.pass_())
    starts = max(placement.DISPATCH_LIMIT, placement.STARTS_PER_WORKER * n)
    assert len(out) == starts
    runs = [wid for i, (wid, _) in enumerate(out) if i == 0 or out[i - 1][0] != wid]
    assert len(runs) == len(set(runs)) == -(-starts // f)          # one run a worker: whole batches
    assert all(sim.core.workers[w].committed["cores"] == f for w in runs[:-1])
    assert [tid for _, tid in out] == sorted(tid for _, tid in out)    # in queue order
    assert sim.core.tiny_out == 0                                       # no budget below SPREAD_CORES
    # the rest of the fleet is filled by the next passes; then every worker holds f
    for _ in range(n):
        if not dispatched(sim.pass_()):
            break
    assert sorted(w.committed["cores"] for w in sim.core.workers.values()) == [f] * n


def test_a_small_fleet_takes_a_worker_again_in_the_same_pass():
    """A short queue on a few workers: a batch is a SPREAD_CORES-th of the queue (here 1), so the
    tasks are spread, and a worker that got one stays open to the rest of the pass."""
    sim = _tiny_fleet(2)
    for _ in range(10):
        sim.submit(new_task())
    sim.take()
    out = dispatched(sim.pass_())
    assert sorted(w for w, _ in out) == [1] * 5 + [2] * 5


def test_past_the_spread_fleet_a_short_queue_of_tiny_tasks_is_still_spread():
    """A batch is a SPREAD_CORES-th of the queue at most: a few hundred tiny tasks on a large
    fleet run side by side, not 16 after one another on a few workers."""
    n = placement.SPREAD_CORES + 27
    sim = _tiny_fleet(n)
    for _ in range(n):
        sim.submit(new_task())
    sim.take()
    out = dispatched(sim.pass_())
    assert len(out) == n and len({w for w, _ in out}) == n     # one each


def test_the_tiny_budget_is_given_back_whatever_ends_a_task():
    """Every way a running task stops (result, failure, cancel, its worker lost) gives back its
    place in the budget; a lost worker's tasks go out again."""
    n = placement.SPREAD_CORES + 27
    sim = _tiny_fleet(n)
    tasks = {t.id: t for t in (sim.submit(new_task()) for _ in range(placement.TINY_BUDGET))}
    sim.take()
    out = []
    while True:
        got = dispatched(sim.pass_())
        if not got:
            break
        out += got
    assert len(out) == len(tasks) == sim.core.tiny_out
    by = {}
    for wid, tid in out:
        by.setdefault(wid, []).append(tid)
    (w1, a), (w2, b) = sorted(by.items())[:2]
    sim.ok(w1, tasks[a[0]], wall=0.001)
    sim.fail(w1, tasks[a[1]])
    sim(Cancel(a[2], "no longer wanted"))
    assert sim.core.tiny_out == len(tasks) - 3
    sim(WorkerLost(w2, "gone"))
    assert sim.core.tiny_out == len(tasks) - 3 - len(b)
    sim.take()
    again = dispatched(sim.pass_())
    assert sorted(tid for _, tid in again) == sorted(b) and w2 not in {w for w, _ in again}
    assert sim.core.tiny_out == len(tasks) - 3


def test_a_pass_in_parts_starts_what_the_whole_pass_would():
    """The server cuts a pass into parts (Schedule(part=n)), carrying each part's commands before
    the next, and a release touches its worker's place in the load index only at the next pass:
    the same tasks start on the same workers, in the same order, as whole passes with a touch per
    release, through joins, losses, results, tasks that fit nowhere and tasks sent ahead."""
    import random
    from vinehpc.core.events import Schedule
    core = None

    class Eager(dict):
        """A release's touch at once, as before the index was touched once a pass."""
        def __setitem__(self, w, _):
            placement.touch(core, w)

    def play(part):
        nonlocal core
        rnd = random.Random(11)
        sim = Sim("fcfs")
        core = sim.core
        if not part:
            core.moved = Eager()
        running, out, parts = {}, [], 0
        wids = iter(range(1, 10 ** 6))
        for _ in range(60):
            sim.join(next(wids), cores=rnd.choice([1, 2, 4]), memory=rnd.choice([500, 1000]), host="h")
        for step in range(300):
            r = rnd.random()
            if r < 0.03:
                sim.join(next(wids), cores=rnd.choice([1, 2, 4]), memory=rnd.choice([500, 1000]), host="h")
            elif r < 0.05 and sim.core.workers:
                wid = rnd.choice(sorted(sim.core.workers))
                sim(WorkerLost(wid, "gone"))
                running = {t: w for t, w in running.items() if w != wid}
            elif r < 0.4:
                for _ in range(rnd.choice([1, 20, 200])):
                    mem = rnd.choice([None, 300, 600, 5000])        # 5000: fits no worker
                    sim.submit(new_task(cores=rnd.choice([1, 1, 2]), **({"memory": mem} if mem else {})))
            else:
                for tid in rnd.sample(sorted(running), min(len(running), rnd.choice([1, 30]))):
                    sim.ok(running.pop(tid), type("T", (), {"id": tid})(), wall=rnd.choice([0.001, 0.2]))
            sim.take()
            cmds = sim(Schedule(part=part))
            while sim.core.pass_left is not None:
                parts += 1
                cmds += sim(Schedule(part=part))
            got = dispatched(cmds)
            running.update((tid, wid) for wid, tid in got)
            out.append(got)
        return out, parts

    global _ids
    first = _ids
    _ids = itertools.count(10 ** 6)
    whole, none = play(0)
    _ids = itertools.count(10 ** 6)
    cut, parts = play(7)
    _ids = first
    assert none == 0 and parts > 50        # (the passes were cut: the test compares something)
    assert sum(map(len, whole)) > 500
    assert cut == whole


def test_an_idle_worker_holds_no_task_set_for_the_collector():
    """Issue 15: on thousands of idle workers their empty sets were cache-cold objects every full
    collection walked.  A worker's task set exists while it holds tasks, and only then."""
    from vinehpc.core.workers import NONE      # one empty frozenset, shared by every worker
    sim = Sim("fcfs")
    sim.join(1, cores=2)
    w = sim.core.workers[1]
    assert w.tasks is NONE and w.fns is NONE
    a, b = sim.submit(new_task()), sim.submit(new_task())
    sim.take()
    assert sorted(tid for _, tid in dispatched(sim.pass_())) == [a.id, b.id]
    assert w.tasks == {a.id, b.id}
    sim.ok(1, a)
    assert w.tasks == {b.id}
    sim.ok(1, b)
    assert w.tasks is NONE
    c = sim.submit(new_task())
    sim.take()
    assert dispatched(sim.pass_()) == [(1, c.id)] and w.tasks == {c.id}
