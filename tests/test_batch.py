"""Issue 15's per-task cost: what a loop turn sends one peer travels as `batch` messages
(comm.Connection), and a worker holds many tiny tasks ahead (core/placement.py's prefetch):
batches split within the message limits and arrive whole and in order, a lost worker's
prefetched tasks are requeued once each and end exactly once."""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vinehpc.comm import Connection
from vinehpc.comm import conn as connmod
from vinehpc.core import placement
from vinehpc.core.events import TaskResult, WorkerLost
from vinehpc.protocol import ProtocolError, messages, wire

from vinehpc.core.commands import SendTask
from test_core import Sim, dispatched, done, logs, new_task, of
from test_protocol import connection_pair

RES0 = {"cores": 1, "memory": 0, "disk": 0, "gpus": 0}


@pytest.fixture
def pair():
    yield from connection_pair(1 << 22)


def _task(i):
    return {"cmd": "echo %d" % i, "id": i, "inputs": [], "outputs": [], "res": RES0, "category": "c"}


def _result(i, **kw):
    return dict({"id": i, "status": "success", "wall": 0.0, "exit_code": 0}, **kw)


def _wire(ca, cb):
    """Flush ca; (the raw messages cb's framing sees, the messages cb's Connection gives)."""
    assert ca.flush()           # (both socket buffers hold all of it)
    raw = b""
    while True:
        try:
            got = cb.sock.recv(1 << 22)
        except BlockingIOError:
            break
        raw += got
    dec = messages.decoder()
    framed = dec.feed(raw)
    assert not dec.buf
    return framed, cb.feed(raw)


def test_messages_queued_back_to_back_go_as_one_batch_and_keep_their_order(pair):
    ca, cb = pair
    for i in range(3):
        ca.send("task", _task(i), [b"args%d" % i] if i == 1 else ())
    ca.send("ping")                      # any other message closes the batch: the order is kept
    ca.send("task", _task(3))
    ca.send("task", _task(4))
    framed, got = _wire(ca, cb)
    assert [m[0] for m in framed] == ["batch", "ping", "batch"]
    assert [(n, c.get("id"), f) for n, c, f in got] == [("task", 0, []), ("task", 1, [b"args1"]), ("task", 2, []),
                                                         ("ping", None, []), ("task", 3, []), ("task", 4, [])]
    for n, c, f in got:
        messages.decode(n, c, f)         # each item is the message it was


def test_one_message_alone_goes_as_itself(pair):
    ca, cb = pair
    ca.send("result", _result(7), [b"value"])
    framed, got = _wire(ca, cb)
    assert framed == got == [("result", _result(7), [b"value"])]


def test_batches_split_at_the_frame_limit_and_the_control_budget(pair):
    ca, cb = pair
    n = 2 * wire.MAX_FRAMES + 3
    for i in range(n):
        ca.send("result", _result(i), [b"v%d" % i])
    big = "x" * (connmod.BATCH_CTL // 2)
    for i in range(n, n + 5):           # about two per batch by size
        ca.send("result", _result(i, stdout=big))
    huge = "y" * (connmod.BATCH_CTL + 10)
    ca.send("result", _result(n + 5, stdout=huge))      # larger than a batch's budget: alone
    ca.send("result", _result(n + 6))
    framed, got = _wire(ca, cb)
    assert [c["id"] for _, c, _ in got] == list(range(n + 7))
    assert [f for _, _, f in got[:n]] == [[b"v%d" % i] for i in range(n)]
    assert got[n + 5][1]["stdout"] == huge
    for name, ctl, frames in framed:
        assert len(frames) <= wire.MAX_FRAMES and len(wire.encode_ctl(ctl)) <= wire.MAX_CTL
    assert [len(f) for name, _, f in framed if name == "batch"][:3] == [wire.MAX_FRAMES, wire.MAX_FRAMES, 3]
    assert len(framed) >= 3 + 3 + 1


def test_a_batch_whose_frames_do_not_add_up_is_refused():
    ctl = {"m": [["result", 1, _result(1)], ["result", 0, _result(2)]]}
    assert [f for _, _, f in messages.unbatch(ctl, [b"v"])] == [[b"v"], []]
    for frames in ([], [b"v", b"w"]):
        with pytest.raises(ProtocolError, match="^batch message: its items name 1 frame"):
            messages.unbatch(ctl, frames)
    with pytest.raises(ProtocolError, match="^result message: field 'status'"):     # items are validated too
        messages.decode("batch", {"m": [["result", 0, dict(_result(1), status="")]]}, [])


def test_a_connection_refuses_a_bad_batch_as_any_bad_message(pair):
    ca, cb = pair
    ca.send_bytes(wire.encode_bytes(messages.CODES["batch"], {"m": [["kill", 0, {"id": 1}]]}))
    ca.flush()
    cb.sock.settimeout(5)
    with pytest.raises(ProtocolError, match="^batch message: field 'm'"):
        cb.feed(cb.sock.recv(1 << 16))


def _batch(*items):
    """A batch message's bytes carrying (name, ctl) items without frames, as any sender could build it."""
    return wire.encode_bytes(messages.CODES["batch"], {"m": [[n, 0, c] for n, c in items]})


BAD_TASK = dict(_task(2), cmd=None)        # neither cmd nor fid: refused by decode()
NO_CMD = "task message: needs exactly one of the fields 'cmd', 'fid'"


def test_a_batch_is_validated_whole_before_any_item_is_given(pair):
    """A batch with a bad item gives none of its items (the ones ahead of the bad one included) and
    is refused for that item's reason; what came before it is still given, however it was read."""
    ca, cb = pair
    ca.send_bytes(messages.encode_bytes(messages.Ping()) + _batch(("result", _result(1)), ("task", BAD_TASK)))
    assert ca.flush()
    cb.sock.settimeout(5)
    got = cb.typed(cb.sock.recv(1 << 16))
    assert next(got) == (messages.Ping(), {})
    with pytest.raises(ProtocolError, match="^" + NO_CMD):
        next(got)


@pytest.mark.timeout(60)
def test_the_manager_refuses_a_batch_with_a_bad_item_for_that_item_and_acts_on_none_of_it(tmp_path):
    """A valid task item ahead of an invalid one was refused as an unexpected message (the manager
    acted on it first): the reason test_fuzz expects is the bad item's.  A valid result ahead of a
    bad item is not taken either (no 'stale result' of it: the core never saw it)."""
    import vinehpc
    from conftest import poll, read_journal
    from test_e2e import _closed_by_manager, _joined_raw_worker
    m = vinehpc.Manager(run_dir=str(tmp_path / "run"), local_workers=0)
    try:
        for first in (("task", _task(1)), ("result", _result(987654))):
            s = _joined_raw_worker(m)
            s.sendall(_batch(first, ("task", BAD_TASK)))
            assert _closed_by_manager(s)[0], "the manager kept a worker that sent a bad batch"
            s.close()
        lost = poll(lambda: len(read_journal(m, "worker lost")) == 2 and read_journal(m, "worker lost"), 20,
                    "both raw workers lost in the journal")
        assert [r["reason"] for r in lost] == ["protocol error: " + NO_CMD] * 2
        assert not [r for r in read_journal(m) if r.get("event") == "stale result" and r.get("task") == 987654]
    finally:
        m.close()


@pytest.mark.timeout(120)
class _RawWorker:
    """A raw worker of 1 core joined to `m` (it sends what a test says), and a task with the output
    o.txt submitted for it."""

    def __init__(self, m, tmp_path):
        import vinehpc
        from test_e2e import _authenticated_raw
        self.s = s = _authenticated_raw(m)
        s.sendall(messages.encode_bytes(messages.Info(cores=1, memory=1000, disk=1000, gpus=0, host="raw", pid=1,
                                                      cached=[], workdir="/nonexistent", version=wire.VERSION)))
        self.conn = Connection(s, b"")
        self.out = tmp_path / "o.txt"
        self.tid = m.submit(vinehpc.Task("true").add_output(m.declare_file(str(self.out)), "o.txt"))
        self.deadline = time.monotonic() + 60

    def next_of(self, want):
        while time.monotonic() < self.deadline:
            if select.select([self.s], [], [], 1)[0]:
                for name, ctl, _ in self.conn.read():
                    if name == want:
                        return ctl
        raise AssertionError("no %s came" % want)

    def send(self, name, ctl, frames=()):
        self.conn.send(name, ctl, list(frames))
        assert self.conn.flush()


def test_an_attempt_sent_again_to_the_same_worker_takes_only_its_own_outputs_and_result(tmp_path):
    """A worker reports it could not run a task (worker_fault); the only worker gets it again,
    numbered (att 2).  Output chunks and a result naming the first attempt -- late ones of an
    attempt killed there -- are dropped; the second attempt's are taken."""
    import vinehpc
    from conftest import read_journal
    m = vinehpc.Manager(run_dir=str(tmp_path / "run"), local_workers=0)
    try:
        w = _RawWorker(m, tmp_path)
        tid, send = w.tid, w.send
        first = w.next_of("task")
        assert first["id"] == tid and "att" not in first
        send("result", {"id": tid, "status": "input missing", "wall": 0.0, "reason": "disk full", "worker_fault": True})
        again = w.next_of("task")
        assert again["id"] == tid and again["att"] == 2
        chunk = {"id": tid, "remote": "o.txt", "tar": False, "off": 0, "last": True, "size": 6}
        send("outfile", dict(chunk, att=2), [b"fresh\n"])
        send("outfile", chunk, [b"stale\n"])                          # the first attempt's, late
        send("result", {"id": tid, "status": "success", "wall": 0.0, "exit_code": 0})       # its result, late
        send("result", {"id": tid, "status": "success", "wall": 0.1, "exit_code": 0, "att": 2})
        got = m.wait(30)
        assert got is not None and got.id == tid and got.successful() and got.attempts == 2
        assert w.out.read_text() == "fresh\n"
        assert [r["attempt"] for r in read_journal(m, "stale result") if r.get("task") == tid] == [1]
        w.s.close()
    finally:
        m.close()


def test_a_file_begun_by_an_attempt_killed_on_a_worker_is_neither_finished_nor_continued(tmp_path):
    """Output chunks of a file that comes in several: the first of attempt 1 arrives while it is in
    flight; the worker then reports it could not run the task, which is sent to it again.  The late
    last chunk of attempt 1 does not finish the file (it is dropped with what was begun), and
    attempt 2's file is its own, whole."""
    import vinehpc
    m = vinehpc.Manager(run_dir=str(tmp_path / "run"), local_workers=0)
    try:
        w = _RawWorker(m, tmp_path)
        tid, send = w.tid, w.send
        assert w.next_of("task")["id"] == tid
        chunk = {"id": tid, "remote": "o.txt", "tar": False, "size": 12}
        send("outfile", dict(chunk, off=0, last=False), [b"stale "])
        send("result", {"id": tid, "status": "input missing", "wall": 0.0, "reason": "disk full", "worker_fault": True})
        assert w.next_of("task")["att"] == 2
        send("outfile", dict(chunk, off=6, last=True), [b"file!\n"])      # attempt 1's last chunk, late
        send("ping", {})
        w.next_of("pong")                       # the manager has read everything before it
        assert not w.out.exists() and not list(tmp_path.glob("o.txt.vinehpc-part-*"))
        send("outfile", dict(chunk, off=0, last=False, att=2), [b"fresh "])
        send("outfile", dict(chunk, off=6, last=True, att=2), [b"file.\n"])
        send("result", {"id": tid, "status": "success", "wall": 0.1, "exit_code": 0, "att": 2})
        got = m.wait(30)
        assert got is not None and got.successful() and got.attempts == 2
        assert w.out.read_text() == "fresh file.\n"
        w.s.close()
    finally:
        m.close()


# ---------------------------------------------------------------- prefetch, and losing what a worker held ahead
def _tiny(sim, wid):
    """The default category learns its tasks are tiny: from now on a worker of a small fleet holds
    PREFETCH_FACTOR times its cores of them."""
    for _ in range(placement.SHORT_SAMPLES):
        t = sim.submit(new_task())
        sim.schedule()
        assert dispatched(sim.take()) == [(wid, t.id)]
        sim.ok(wid, t, wall=0.0)
        sim.take()


def test_a_worker_holds_prefetch_factor_times_its_cores_of_tiny_tasks_sent_ahead():
    sim = Sim()
    sim.join(1)
    _tiny(sim, 1)
    for _ in range(100):
        sim.submit(new_task())
    held = placement.PREFETCH_FACTOR * 2      # test_core's INFO: 2 cores
    assert sim.schedule() == held
    pipes = [c.spec.get("pipe") for c in of(sim.take(), SendTask)]
    assert pipes == [None, None] + [True] * (held - 2)      # beyond its free cores: sent ahead


def test_a_large_fleet_holds_about_ahead_tasks_beyond_its_cores():
    """More ahead would only wait in sockets for the manager (wait() latency), not keep workers busier."""
    sim = Sim()
    sim.join(1)
    _tiny(sim, 1)
    for wid in range(2, 1001):
        sim.join(wid)
    cores = 1000 * 2
    for _ in range(10000):
        sim.submit(new_task())
    held = 0
    while True:
        n = sim.schedule()
        sim.take()
        if not n:
            break
        held += n
    assert cores * 2 < held <= cores + placement.AHEAD_TASKS      # more than twice its cores, no more than that


def test_a_lost_worker_with_prefetched_tasks_requeues_each_once_and_each_ends_once():
    sim = Sim()
    sim.join(1)
    _tiny(sim, 1)
    tasks = [sim.submit(new_task()) for _ in range(40)]
    sim.schedule()
    held = [tid for _, tid in dispatched(sim.take())]
    assert len(held) == placement.PREFETCH_FACTOR * 2
    sim(WorkerLost(1, "connection closed"))
    requeued = [r["task"] for r in logs(sim.take(), "requeued")]
    assert sorted(requeued) == sorted(held)                 # each once
    assert all(sim.state(t) == "ready" for t in tasks)
    sim(TaskResult(1, held[0], {"status": "success", "wall": 0.0, "exit_code": 0}))     # late, from the lost one
    assert not done(sim.take())
    sim.join(2)
    ended, by_id = [], {t.id: t for t in tasks}
    for _ in range(len(tasks)):           # (at least one ends a pass)
        if len(ended) == len(tasks):
            break
        sim.schedule()
        for wid, tid in dispatched(sim.take()):
            assert wid == 2
            sim.ok(2, by_id[tid], exit_code=0, wall=0.0)     # (echoes the attempt number, as a worker)
            ended += [t.id for t in done(sim.take())]
    assert sorted(ended) == sorted(t.id for t in tasks)     # every task ends exactly once


# ---------------------------------------------------------------- a real worker
def test_a_real_worker_opens_a_batch_of_tasks_and_answers_each_once(tmp_path):
    from test_fuzz import FakeManager
    fm = FakeManager(tmp_path)
    p = subprocess.Popen([sys.executable, "-m", "vinehpc", "worker", "127.0.0.1:%d" % fm.port, "--secret-file",
                          fm.secret_file, "--cores", "1", "--connect-timeout", "30"], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        s = fm.accept()
        dec = fm.join(s)
        conn = Connection(s, bytes(dec.buf))
        for i in range(1, 9):               # one message on the wire: eight tasks for one core
            # a task sent again is numbered (att, from 2): its result says which attempt it ends
            conn.send("task", dict(_task(i), **({"pipe": True} if i > 1 else {}), **({"att": i} if i % 3 == 0 else {})))
        assert conn.flush()
        results, names, starts = {}, [], {}
        deadline = time.monotonic() + 30
        while len(results) < 8 and time.monotonic() < deadline:
            if not select.select([s], [], [], 1)[0]:
                continue
            for name, ctl, frames in conn.read():
                names.append(name)
                if name == "result":
                    assert ctl["id"] not in results, "a result came twice"
                    results[ctl["id"]] = ctl
                    starts.update((i, (ctl.get("started_att") or {}).get(str(i))) for i in ctl.get("started", ()))
                elif name == "started":
                    starts.update((i, (ctl.get("att") or {}).get(str(i))) for i in ctl["ids"])
        assert sorted(results) == list(range(1, 9)), (names, p.stderr.read1(4096) if p.poll() is not None else "")
        assert all(r["status"] == "success" and r["stdout"] == "%d\n" % i for i, r in results.items())
        assert {i: r.get("att") for i, r in results.items() if "att" in r} == {3: 3, 6: 6}
        # the starts reported (tasks sent ahead: 2..8) name the attempt of those sent again
        assert sorted(starts) == list(range(2, 9)), (starts, names)
        assert {i: a for i, a in starts.items() if a} == {3: 3, 6: 6}
        # a Python call's result (sent before the worker's bookkeeping, Loop._results_now) echoes it too
        from vinehpc.task import PythonTask
        pt = PythonTask(len, "abc")
        pt._check()
        conn.send("fn", {"fid": pt._fid}, [pt._fbytes])
        conn.send("task", {"id": 20, "fid": pt._fid, "inputs": [], "outputs": [], "res": _task(20)["res"],
                           "category": "default", "att": 7}, [pt._abytes])
        assert conn.flush()
        got = None
        while got is None and time.monotonic() < deadline + 30:
            if select.select([s], [], [], 1)[0]:
                got = next((ctl for name, ctl, _ in conn.read() if name == "result"), None)
        assert got is not None and got["id"] == 20 and got["status"] == "success" and got["att"] == 7, got
        # an output file's chunks name the attempt too (the manager writes no killed attempt's output)
        conn.send("task", dict(_task(30), cmd="echo out > o.txt", outputs=[["o.txt", "file", None]], att=4))
        assert conn.flush()
        got, chunks = None, []
        while got is None and time.monotonic() < deadline + 60:
            if select.select([s], [], [], 1)[0]:
                for name, ctl, frames in conn.read():
                    if name == "outfile":
                        chunks.append((ctl, b"".join(bytes(f) for f in frames)))
                    elif name == "result":
                        got = ctl
        assert got is not None and got["id"] == 30 and got["status"] == "success" and got["att"] == 4, got
        assert [(c["id"], c["remote"], c.get("att"), data) for c, data in chunks] == [(30, "o.txt", 4, b"out\n")]
        conn.send("exit", {"reason": "test over", "final": True})
        conn.flush()
        assert p.wait(30) == 0
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
        fm.lsock.close()


# -- a task's control part: encoded in parts, cached by what alike tasks share (conn.task_ctl) --
_text = st.text(st.characters(codec="utf-8"), max_size=20)
_plain = st.fixed_dictionaries(
    {"id": st.integers(messages.ID_MIN, messages.ID_MAX), "outputs": st.just([]),
     "inputs": st.sampled_from([[], [["cn", "x", "file", "task", None]]]),
     "res": st.fixed_dictionaries({k: st.sampled_from([0, 1, 2, 1.0, 2.5, True]) for k in messages.RES}),
     "category": st.sampled_from(["default", "é\"\\", "c"])},
    optional={"pipe": st.sampled_from([True, False]), "env": st.just({"A": "b"}), "att": st.integers(2, 1000)})


@settings(max_examples=300, deadline=None)
@given(_plain, st.sampled_from(["cmd", "fid"]), _text)
def test_a_task_control_part_is_the_json_of_its_message_whether_encoded_in_parts_or_whole(spec, head, text):
    spec = dict(spec, **{head: text})
    for _ in range(2):              # the first encodes the shared part, the second reuses it
        body = connmod.task_ctl(spec)
        assert json.loads(body) == spec
        assert type(json.loads(body)["res"]["cores"]) is type(spec["res"]["cores"])   # 1.0 stays 1.0
        body.decode("utf-8")        # the wire's control parts are UTF-8 (orjson writes non-ASCII as it is)


def test_alike_tasks_share_their_encoded_tail_and_the_cache_stays_bounded():
    connmod._tails.clear()
    for i in range(3 * connmod.TAILS):
        connmod.task_ctl(dict(_task(i), category="c%d" % (i % (2 * connmod.TAILS))))
        assert len(connmod._tails) <= connmod.TAILS
    connmod._tails.clear()
    for i in range(100):
        connmod.task_ctl(_task(i))
    assert len(connmod._tails) == 1
