"""The manager core's files: inputs named at submit, puts, task-made files, temps and their
recovery (events in, commands out; see test_core.py for the Sim)."""
import pytest

from vinehpc.core.commands import GetFile, PutFile, ResolveFile, SendFunction, SendTask
from vinehpc.core.events import FileFetched, FileResolved, WorkerLost
from vinehpc.file import Buffer, Temp
from vinehpc.task import PythonTask

from test_core import Sim, dispatched, done, infile_factory, logs, new_task, of


@pytest.fixture
def sim():
    return Sim()


@pytest.fixture
def infile(tmp_path):
    return infile_factory(tmp_path)


# ---------------------------------------------------------------- files
def test_cached_file_put_once_per_worker(sim, infile):
    f = infile(cache=True)
    a = sim.submit(new_task().add_input(f, "in"))
    b = sim.submit(new_task().add_input(f, "in"))
    sim.join(1)
    sim.schedule()
    cmds = sim.take()
    assert [(c.wid, c.file, c.cachename) for c in of(cmds, PutFile)] == [(1, f, f.cachename())]
    assert dispatched(cmds) == [(1, a.id), (1, b.id)]
    # the put is queued before the task that needs it
    assert cmds.index(of(cmds, PutFile)[0]) < cmds.index(of(cmds, SendTask)[0])


def test_cached_file_not_put_again_for_later_task(sim, infile):
    f = infile(cache=True)
    a = sim.submit(new_task().add_input(f, "in"))
    sim.join(1)
    sim.schedule()
    sim.take()
    sim.ok(1, a, wall=1.0)
    sim.submit(new_task().add_input(f, "in"))
    sim.schedule()
    cmds = sim.take()
    assert len(dispatched(cmds)) == 1 and of(cmds, PutFile) == []


def test_cached_file_put_to_each_worker(sim, infile):
    sim.core.transfers.enabled = False      # peer transfers (on by default): test_peer_transfers.py
    f = infile(cache=True)
    sim.submit(new_task(cores=2).add_input(f, "in"))
    sim.submit(new_task(cores=2).add_input(f, "in"))
    sim.join(1)
    sim.join(2, host="h2")
    sim.schedule()
    assert sorted(c.wid for c in of(sim.take(), PutFile)) == [1, 2]


def test_task_level_file_put_again(sim, infile):
    f = infile(cache=False)
    a = sim.submit(new_task().add_input(f, "in"))
    sim.join(1)
    sim.schedule()
    assert len(of(sim.take(), PutFile)) == 1
    sim.ok(1, a, wall=1.0)
    sim.submit(new_task().add_input(f, "in"))
    sim.schedule()
    assert len(of(sim.take(), PutFile)) == 1


def test_file_reported_cached_at_join_not_put(sim, infile):
    f = infile(cache=True)
    sim.submit(new_task().add_input(f, "in"))
    sim.join(1, cached=[f.cachename()])
    sim.schedule()
    cmds = sim.take()
    assert len(dispatched(cmds)) == 1 and of(cmds, PutFile) == []


def test_inputs_are_named_at_submit_and_the_wire_task_carries_the_names(sim, infile):
    f = infile(cache=True)
    buf = Buffer(b"12345")
    t = sim.submit(new_task().add_input(f, "in").add_input(buf, "b"))
    assert sim.ts(t).inputs == [(f.cachename(), 4, False), (buf.cachename(), 5, False)]
    sim.join(1)
    sim.schedule()
    spec = of(sim.take(), SendTask)[0].spec
    assert [i[:2] for i in spec["inputs"]] == [[f.cachename(), "in"], [buf.cachename(), "b"]]
    assert spec["id"] == t.id and spec["cmd"] == "true" and spec["res"]["cores"] == 1


def test_a_file_made_by_a_task_is_named_on_the_io_side_once_made(sim, infile):
    f = infile(cache=True, name="made.txt")
    p = sim.submit(new_task("make").add_output(f, "out"))
    c = sim.submit(new_task("use").add_input(f, "in"))
    sim.join(1)
    sim.schedule()
    assert dispatched(sim.take()) == [(1, p.id)]
    cmds = sim.ok(1, p)
    assert [x.file for x in of(cmds, ResolveFile)] == [f] and sim.state(c) == "waiting"
    sim(FileResolved(f.id, "file-made", 7))
    sim.schedule()
    cmds = sim.take()
    assert dispatched(cmds) == [(1, c.id)] and [x.cachename for x in of(cmds, PutFile)] == ["file-made"]


def test_a_file_made_by_a_task_that_cannot_be_read_is_input_missing(sim, infile):
    f = infile(cache=True, name="made.txt")
    p = sim.submit(new_task("make").add_output(f, "out"))
    c = sim.submit(new_task("use").add_input(f, "in"))
    sim.join(1)
    sim.schedule()
    sim.ok(1, p)
    cmds = sim(FileResolved(f.id, None, error="input file 'made.txt' cannot be read: gone"))
    assert done(cmds) == [c] and c.result == "input missing" and "made.txt" in c.reason


def test_python_function_sent_once_per_worker(sim):
    a = sim.submit(PythonTask(divmod, 7, 2))
    b = sim.submit(PythonTask(divmod, 9, 2))
    sim.join(1)
    sim.schedule()
    cmds = sim.take()
    fns = of(cmds, SendFunction)
    assert len(fns) == 1 and fns[0].wid == 1 and fns[0].fid == a._fid and fns[0].data == a._fbytes
    assert cmds.index(fns[0]) < cmds.index(of(cmds, SendTask)[0])
    assert dispatched(cmds) == [(1, a.id), (1, b.id)]
    assert of(cmds, SendTask)[0].payload == a._abytes


# ---------------------------------------------------------------- temps
def producer_consumer(sim):
    t = Temp()
    p = sim.submit(new_task("make").add_output(t, "out"))
    c = sim.submit(new_task("use").add_input(t, "in"))
    return t, p, c


def test_temp_consumer_waits_for_producer(sim):
    t, p, c = producer_consumer(sim)
    sim.join(1)
    sim.schedule()
    assert dispatched(sim.take()) == [(1, p.id)]
    assert sim.state(c) == "waiting"


def test_temp_consumer_runs_where_temp_is(sim):
    t, p, c = producer_consumer(sim)
    sim.join(1)
    sim.schedule()
    sim.take()
    other = sim.submit(new_task())                   # keeps worker 1 busier than worker 2
    sim.schedule()
    assert dispatched(sim.take()) == [(1, other.id)]
    sim.join(2, host="h2")
    sim.ok(1, p, temps=[t.cachename()])
    assert sim.state(c) == "ready"
    sim.schedule()
    cmds = sim.take()
    assert dispatched(cmds) == [(1, c.id)]
    assert of(cmds, PutFile) == [] and of(cmds, GetFile) == []
    assert sim.state(other) == "running"


def test_temp_fetched_via_manager_when_holder_is_full(sim):
    t, p, c = producer_consumer(sim)
    sim.join(1, cores=1)
    sim.schedule()
    sim.take()
    blocker = sim.submit(new_task())                 # queued ahead of the consumer
    sim.ok(1, p, temps=[t.cachename()], wall=1.0)
    sim.schedule()
    assert dispatched(sim.take()) == [(1, blocker.id)]
    sim.join(2, host="h2")
    sim.schedule()
    cmds = sim.take()
    assert dispatched(cmds) == [] and of(cmds, GetFile) == [GetFile(1, t.cachename())]
    sim.schedule()
    assert of(sim.take(), GetFile) == []             # one fetch at a time
    sim(FileFetched(t.cachename(), "/manager/copy"))
    sim.schedule()
    cmds = sim.take()
    assert dispatched(cmds) == [(2, c.id)]
    assert [(x.wid, x.cachename, x.path) for x in of(cmds, PutFile)] == [(2, t.cachename(), "/manager/copy")]


def test_temp_lost_reruns_producer_for_new_consumer(sim):
    t = Temp()
    p = sim.submit(new_task("make").add_output(t, "out"))
    sim.join(1)
    sim.schedule()
    sim.ok(1, p, temps=[t.cachename()])
    assert done(sim.take()) == [p]
    sim(WorkerLost(1, "gone"), 1.0)
    sim.join(2, 1.0, host="h2")
    c = sim.submit(new_task("use").add_input(t, "in"), 1.0)
    assert sim.state(c) == "waiting"
    sim.schedule(1.0)
    cmds = sim.take()
    [(wid, rid)] = dispatched(cmds)
    assert wid == 2 and rid < 0
    rec = sim.core.tasks[rid].task
    assert rec.command == "make" and rec is not p and p.id > 0
    assert of(cmds, SendTask)[0].spec["cmd"] == "make"
    assert logs(cmds, "recreate")[0]["task"] == p.id
    sim.ok(2, rec, temps=[t.cachename()])
    assert done(sim.take()) == []                    # the recovery task is not shown to the user
    sim.schedule(1.0)
    assert dispatched(sim.take()) == [(2, c.id)]
    assert done(sim.ok(2, c)) == [c]


def test_temp_lost_with_running_consumer_reruns_producer(sim):
    t, p, c = producer_consumer(sim)
    sim.join(1)
    sim.schedule()
    sim.take()
    sim.ok(1, p, temps=[t.cachename()])
    sim.schedule()
    assert dispatched(sim.take()) == [(1, c.id)]
    sim(WorkerLost(1, "gone"), 1.0)                  # consumer and the only copy of the temp die
    sim.join(2, 1.0, host="h2")
    sim.schedule(1.0)
    recovery = [tid for _, tid in dispatched(sim.take())]
    assert len(recovery) == 1 and recovery[0] < 0


def test_temp_lost_with_ready_consumer_reruns_producer(sim):
    t, p, c = producer_consumer(sim)
    sim.join(1, cores=1)
    sim.schedule()
    blocker = sim.submit(new_task())
    sim.ok(1, p, temps=[t.cachename()], wall=1.0)
    sim.take()
    assert sim.state(c) == "ready"
    sim(WorkerLost(1, "gone"), 1.0)
    sim.join(2, 1.0, host="h2")
    sim.schedule(1.0)
    assert any(tid < 0 for _, tid in dispatched(sim.take()))
    assert sim.state(blocker) == "running"


def test_consumer_of_failed_producer_is_input_missing(sim):
    t, p, c = producer_consumer(sim)
    sim.join(1)
    sim.schedule()
    sim.take()
    sim.fail(1, p, reason="exit code 2")
    assert set(done(sim.take())) == {p, c}
    assert p.completed() and p.exit_code == 1 and not p.successful()     # TaskVine's result for an exit code
    assert c.result == "input missing" and "not produced" in c.reason and "exit code 2" in c.reason
    sim.schedule()
    assert dispatched(sim.take()) == []


def test_late_consumer_of_failed_producer_is_input_missing(sim):
    t = Temp()
    p = sim.submit(new_task("make").add_output(t, "out"))
    sim.join(1)
    sim.schedule()
    sim.fail(1, p)
    sim.take()
    c = sim.submit(new_task("use").add_input(t, "in"))
    assert done(sim.take()) == [c] and c.result == "input missing"


def test_file_output_consumer_waits_for_producer(sim, infile):
    f = infile(cache=True, name="made.txt")
    p = sim.submit(new_task("make").add_output(f, "out"))
    c = sim.submit(new_task("use").add_input(f, "in"))
    sim.join(1)
    sim.schedule()
    assert dispatched(sim.take()) == [(1, p.id)]
    sim.ok(1, p)
    sim(FileResolved(f.id, f.cachename(), 4))
    sim.schedule()
    assert dispatched(sim.take()) == [(1, c.id)]
