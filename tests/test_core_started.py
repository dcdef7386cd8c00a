"""The core's `started` journal records, by events: logged at dispatch for a task sent to a worker
with room, from the worker's report (a `started` message, or ids riding on a result) for one
sent ahead; once per attempt, stale ids ignored."""
from vinehpc.core import placement
from vinehpc.core.commands import SendTask
from vinehpc.core.events import TaskResult, TasksStarted, WorkerLost
from vinehpc.file import URL

from test_core import Sim, _run_fast, new_task, of


def journal(cmds):
    """[(event, task)] of the records of task attempts, in order."""
    return [(c["event"], c.get("task")) for c in of(cmds, dict)
            if c["event"] in ("dispatched", "started", "done", "failed", "requeued")]


def started(cmds):
    return [c for c in of(cmds, dict) if c["event"] == "started"]


def short_sim(cores=1):
    """A worker, and the default category known as short (its next tasks are sent pipelined)."""
    sim = Sim()
    sim.join(1, cores=cores)
    _run_fast(sim, 1, placement.SHORT_SAMPLES, wall=0.001)
    return sim


def test_a_task_sent_with_room_starts_at_its_dispatch():
    sim = Sim()
    sim.join(1)
    t = sim.submit(new_task())
    sim.take()
    sim.schedule(now=5.0)
    out = sim.take()
    assert "pipe" not in of(out, SendTask)[0].spec
    assert journal(out) == [("dispatched", t.id), ("started", t.id)]
    assert started(out) == [{"event": "started", "task": t.id, "worker": 1, "attempt": 1, "queued": False}]
    sim(TasksStarted(1, [t.id]))                     # (a worker would not send it): never twice
    assert started(sim.take()) == []


def test_a_pipelined_task_starts_when_its_worker_says():
    sim = short_sim()
    a, b, c = sim.submit(new_task()), sim.submit(new_task()), sim.submit(new_task())
    sim.schedule()
    out = sim.take()
    # a fits in the idle worker: it starts as it arrives; b and c are sent ahead
    assert [x.spec.get("pipe") for x in of(out, SendTask)] == [None, True, True]
    assert [r["task"] for r in started(out)] == [a.id]
    # b started as a returned: its id rides on a's result, logged after a's end
    sim(TaskResult(1, a.id, {"status": "success", "exit_code": 0, "wall": 0.01, "started": [b.id]}))
    assert journal(sim.take()) == [("done", a.id), ("started", b.id)]
    sim(TasksStarted(1, [c.id]))
    assert started(sim.take()) == [{"event": "started", "task": c.id, "worker": 1, "attempt": 1, "queued": True}]


def test_a_start_that_rides_on_its_own_result_is_not_logged():
    """Heard of with its end: its ending record's time minus wall is its start (the report's)."""
    sim = short_sim()
    a, b, c = sim.submit(new_task()), sim.submit(new_task()), sim.submit(new_task())
    sim.schedule()
    sim.ok(1, a)
    sim.take()
    sim(TaskResult(1, b.id, {"status": "success", "exit_code": 0, "wall": 0.01, "started": [b.id, c.id]}))
    assert journal(sim.take()) == [("done", b.id), ("started", c.id)]


def url_task(sim):
    t = new_task()
    t.add_input(URL("http://example.invalid/x"), "in")
    return sim.submit(t)


def test_stale_and_repeated_ids_are_ignored():
    sim = Sim()
    sim.join(1)
    sim.join(2)
    a = url_task(sim)
    sim.schedule()
    sim.take()
    wid = sim.ts(a).wid
    other = 3 - wid
    sim(TasksStarted(other, [a.id, 12345]))          # another worker's word, an unknown task
    sim(TasksStarted(wid, [a.id]))
    sim(TasksStarted(wid, [a.id]))                   # once per attempt
    assert [r["task"] for r in started(sim.take())] == [a.id]
    sim(WorkerLost(wid, "gone"))                     # requeued: its next attempt starts again
    sim(TasksStarted(wid, [a.id]))
    assert started(sim.take()) == []
    sim.schedule()
    sim.take()
    assert sim.ts(a).wid == other and not sim.ts(a).started
    sim(TasksStarted(other, [a.id]))                 # the start of a first attempt: not this one's
    assert started(sim.take()) == []
    sim(TasksStarted(other, [a.id], {str(a.id): 1}))  # nor one naming another attempt
    assert started(sim.take()) == []
    sim(TasksStarted(other, [a.id], {str(a.id): 2}))  # a task sent again: its start names its attempt
    assert [(r["task"], r["worker"], r["attempt"]) for r in started(sim.take())] == [(a.id, other, 2)]


def test_tasks_that_may_wait_on_their_worker_are_reported():
    """Not pipelined, but its worker fetches a URL first: the worker tells its start."""
    sim = Sim()
    sim.join(1)
    t = url_task(sim)
    sim.schedule()
    out = sim.take()
    assert "pipe" not in of(out, SendTask)[0].spec and started(out) == []
    sim(TasksStarted(1, [t.id]))
    assert [r["queued"] for r in started(sim.take())] == [True]
