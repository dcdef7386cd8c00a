"""End-to-end: a real Manager, real worker processes, real TCP; no mocks.

One behaviour per test.  Every wait has a deadline (wait_all/poll fail with the manager's
stats, journal tail and thread dump), and every test carries its own timeout.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import cloudpickle
import psutil
import pytest

import vinehpc
from vinehpc import PythonTask, RemoteTraceback, Task, TaskError
from vinehpc.protocol import auth, handshake, messages, wire

from conftest import (assert_no_survivors, close_and_check, diagnose, poll, process_tree, read_journal,
                      tree_running, wait_all, worker_cmd)

# Workers cannot import this test module: send its functions by value (what `vinehpc run`
# does for the user's script directory).
cloudpickle.register_pickle_by_value(sys.modules[__name__])

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def square(x):
    return x * x


def sleepy_square(x, delay=0.005):
    time.sleep(delay)
    return x * x


def raise_value_error_for_test(x):
    raise ValueError("bad value %r" % (x,))


def during_run(records):
    """Records up to the last task result (workers leaving at close() come after it)."""
    last = max((i for i, r in enumerate(records) if r.get("event") in ("done", "failed")), default=-1)
    return records[:last + 1]


def by_task(records, event):
    return collections.Counter(r.get("task") for r in records if r.get("event") == event)


@pytest.fixture
def spawned():
    """Popen objects started by a test (each in its own session); killed if still alive at the end."""
    procs = []
    yield procs
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            pass


def start_worker(spawned, m, *extra, env=None):
    p = subprocess.Popen(worker_cmd(m, *extra), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, start_new_session=True, text=True)
    spawned.append(p)
    return p


# ====================================================================== 1. scale, exactly once
@pytest.mark.timeout(120)
def test_many_python_and_command_tasks_return_correct_results_exactly_once(manager, tmp_path):
    m = manager
    d = tmp_path / "data"
    d.mkdir()
    shared_text = "".join("line %d\n" % i for i in range(100))
    (d / "shared.txt").write_text(shared_text)
    shared = m.declare_file(d / "shared.txt", cache=True)

    expect_py = {}
    for i in range(1000):
        expect_py[m.submit(PythonTask(square, i))] = i * i
    expect_cmd = {}
    for i in range(200):
        own = d / ("own%d.txt" % i)
        own.write_text("task %d\n" % i)
        t = Task("cat own.txt shared.txt > out.txt")
        t.add_input(m.declare_file(own, cache=True), "own.txt")
        t.add_input(shared, "shared.txt")
        out = d / ("out%d.txt" % i)
        t.add_output(m.declare_file(out), "out.txt")
        expect_cmd[m.submit(t)] = (out, "task %d\n" % i + shared_text)

    got = wait_all(m, 1200, timeout=90)
    assert set(got) == set(expect_py) | set(expect_cmd)
    assert m.empty() and m.wait(0.1) is None
    for tid, value in expect_py.items():
        t = got[tid]
        assert t.successful(), (tid, t.result, t.reason)
        assert t.output == value
    for tid, (out, text) in expect_cmd.items():
        t = got[tid]
        assert t.successful(), (tid, t.result, t.reason, t.std_output)
        assert out.read_text() == text, tid

    recs = close_and_check(m)
    done = by_task(recs, "done")
    assert set(done) == set(got)
    assert [tid for tid, n in done.items() if n != 1] == []
    assert by_task(recs, "failed") == {}
    assert not [r for r in during_run(recs) if r.get("event") in ("worker lost", "requeued")]


# ====================================================================== 2. cache: once per worker
@pytest.mark.timeout(90)
def test_cached_input_is_sent_once_per_worker(manager, tmp_path):
    m = manager
    big = tmp_path / "big.bin"
    size = 4 << 20
    big.write_bytes(os.urandom(size))
    f = m.declare_file(big, cache=True)
    cachename = f.cachename()
    ids = []
    for i in range(50):
        # a little work per task so that both workers take part
        t = Task("test $(wc -c < big.bin) -eq %d && sleep 0.05 && echo ok" % size)
        t.add_input(f, "big.bin")
        ids.append(m.submit(t))
    got = wait_all(m, len(ids), timeout=60)
    assert all(t.successful() and t.std_output.strip() == "ok" for t in got.values()), \
        [(t.id, t.result, t.reason, t.std_output) for t in got.values() if not t.successful()]
    ran_on = {t.worker for t in got.values()}
    assert len(ran_on) == 2, "both workers should have run tasks, got %s" % ran_on

    recs = close_and_check(m)
    puts = collections.Counter((r.get("worker"), r.get("file")) for r in recs
                               if r.get("event") == "put" and r.get("file") == cachename)
    assert puts, ("the journal has no 'put' record for %s: the engine does not journal file transfers "
                  "({'event':'put','worker':wid,'file':cachename,'size':n})" % cachename)
    # a worker gets it from the manager (put) or, peer transfers being on, from the other worker
    peer = collections.Counter((r.get("dest"), r.get("file")) for r in recs if r.get("event") == "transfer"
                               and r.get("file") == cachename and r.get("source") != "manager")
    assert dict(puts + peer) == {(w, cachename): 1 for w in ran_on}
    sizes = {r.get("size") for r in recs if r.get("event") == "put" and r.get("file") == cachename}
    sizes |= {r.get("bytes") for r in recs if r.get("event") == "transfer" and r.get("file") == cachename}
    assert sizes == {size}


# ====================================================================== 3. temp files
@pytest.mark.timeout(60)
def test_temp_file_flows_from_producer_to_consumer(manager, tmp_path):
    m = manager
    temp = m.declare_temp()
    prod = Task("echo hello vine > out.txt")
    prod.add_output(temp, "out.txt")
    cons = Task("tr a-z A-Z < in.txt > out.txt")
    cons.add_input(temp, "in.txt")
    final = tmp_path / "final.txt"
    cons.add_output(m.declare_file(final), "out.txt")
    pid = m.submit(prod)
    cid = m.submit(cons)     # submitted before the producer ran: it must wait for it
    got = wait_all(m, 2, timeout=30)
    assert got[pid].successful(), (got[pid].result, got[pid].reason)
    assert got[cid].successful(), (got[cid].result, got[cid].reason, got[cid].std_output)
    assert final.read_text() == "HELLO VINE\n"


@pytest.mark.timeout(60)
def test_chain_of_three_tasks_through_temp_files(manager, tmp_path):
    m = manager
    t1, t2 = m.declare_temp(), m.declare_temp()
    a = Task("echo 1 > out.txt")
    a.add_output(t1, "out.txt")
    b = Task("expr $(cat in.txt) + 1 > out.txt")
    b.add_input(t1, "in.txt")
    b.add_output(t2, "out.txt")
    c = Task("expr $(cat in.txt) '*' 10 > out.txt")
    c.add_input(t2, "in.txt")
    final = tmp_path / "final.txt"
    c.add_output(m.declare_file(final), "out.txt")
    ids = [m.submit(c_) for c_ in (a, b, c)]
    got = wait_all(m, 3, timeout=30)
    for tid in ids:
        assert got[tid].successful(), (tid, got[tid].result, got[tid].reason, got[tid].std_output)
    assert final.read_text().strip() == "20"


# ====================================================================== 4. kill -9 a worker
@pytest.mark.timeout(120)
def test_kill9_of_a_worker_requeues_its_tasks_and_every_result_arrives_once(manager):
    m = manager
    expect = {m.submit(PythonTask(sleepy_square, i)): i * i for i in range(500)}
    got = wait_all(m, 60, timeout=60)           # the run is well under way
    victim = m._local.procs[0]
    joined = {r["pid"]: r["worker"] for r in read_journal(m, "worker joined")}
    victim_wid = joined[victim.pid]
    os.kill(victim.pid, signal.SIGKILL)
    rest = wait_all(m, 500 - len(got), timeout=90)
    assert not set(got) & set(rest), "a task came back twice"
    got.update(rest)
    assert {tid: t.output for tid, t in got.items()} == expect
    assert victim.wait(10) == -signal.SIGKILL

    recs = close_and_check(m)
    lost = [r for r in during_run(recs) if r.get("event") == "worker lost"]
    assert [r["worker"] for r in lost] == [victim_wid], lost
    requeued = {r["task"] for r in recs if r.get("event") == "requeued"}
    assert requeued, "the killed worker held tasks, yet nothing was requeued"
    assert requeued <= set(lost[0]["tasks"])
    done = by_task(recs, "done")
    assert [tid for tid in expect if done[tid] != 1] == []
    # requeued tasks finished on the survivor, without being charged a retry
    assert all(got[tid].worker != victim_wid for tid in requeued)
    assert not [r for r in recs if r.get("event") == "retry"]


@pytest.mark.timeout(60)
def test_kill9_of_a_worker_leaves_no_task_process_behind(manager):
    m = manager
    m.submit(Task("sleep 60"))
    rec = poll(lambda: read_journal(m, "dispatched"), 20, "the task to be dispatched", m=m)
    wid = rec[0]["worker"]
    pid = next(r["pid"] for r in read_journal(m, "worker joined") if r["worker"] == wid)
    tree = poll(lambda: tree_running([pid], "sleep"), 20, "the worker to start sleep", m=m)
    children = [p for p in tree if p.pid != pid]
    names = set()
    for p in children:                      # read before the kill: afterwards they may be gone
        try:
            names.add(p.name())
        except psutil.NoSuchProcess:
            pass
    os.kill(pid, signal.SIGKILL)
    assert "sleep" in names
    assert_no_survivors(children, timeout=5, what="processes of a SIGKILLed worker")


# ====================================================================== 5. hostile clients
def _connect(m):
    s = socket.create_connection(("127.0.0.1", m.port), timeout=10)
    s.settimeout(10)
    # small messages go out at once, as a real peer's (Connection sets it): else a second one
    # waits for the manager's delayed ACK of the first (40 ms)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _read_hello(s):
    dec = messages.decoder(max_ctl=wire.PREAUTH_MAX_CTL, allow_frames=False)
    while True:
        m = dec.next_message()
        if m:
            assert m[0] == "hello"
            return m[1]
        b = s.recv(4096)
        assert b, "the manager closed the connection before its hello"
        dec.push(b)


def _closed_by_manager(s):
    """(closed, bytes received) once the manager closes the connection (EOF or reset) or the
    socket timeout (10 s) passes."""
    got = bytearray()
    try:
        while True:
            b = s.recv(65536)
            if not b:
                return True, bytes(got)
            got += b
    except (ConnectionResetError, BrokenPipeError):
        return True, bytes(got)
    except socket.timeout:
        return False, bytes(got)
    finally:
        s.close()


@pytest.mark.timeout(120)
def test_bad_clients_are_rejected_while_the_run_goes_on(manager, spawned):
    m = manager
    expect = {m.submit(PythonTask(sleepy_square, i, 0.02)): i * i for i in range(150)}
    wait_all_first = wait_all(m, 5, timeout=30)      # the run is going

    peers = {}
    # a raw client speaking the handshake with a wrong MAC
    s = _connect(m)
    peers["bad mac"] = "%s:%d" % s.getsockname()[:2]
    hello = _read_hello(s)
    s.sendall(messages.encode_bytes(messages.Auth(v=wire.VERSION, nonce=auth.nonce(),
                                                  mac=auth.mac("not the secret", "worker", hello["nonce"], "x"))))
    assert _closed_by_manager(s) == (True, b""), "bad MAC: no welcome, and the connection is closed"
    # garbage bytes
    s = _connect(m)
    peers["garbage"] = "%s:%d" % s.getsockname()[:2]
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + os.urandom(4096))
    assert _closed_by_manager(s)[0], "garbage: connection stayed open"
    # a valid header claiming a 2 GiB control part
    s = _connect(m)
    peers["oversized"] = "%s:%d" % s.getsockname()[:2]
    _read_hello(s)
    s.sendall(wire.HEADER.pack(wire.MAGIC, wire.VERSION, messages.CODES["auth"], 0, 2 << 30))
    assert _closed_by_manager(s) == (True, b""), "oversized: connection stayed open"
    # a real worker with the wrong secret
    env = dict(os.environ, VINEHPC_SECRET="definitely-not-the-secret")
    bad = subprocess.Popen([sys.executable, "-m", "vinehpc", "worker", "127.0.0.1:%d" % m.port, "--cores", "1",
                            "--no-reconnect", "--connect-timeout", "10"], env=env, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    spawned.append(bad)
    try:
        _, err = bad.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(diagnose(m, "the wrong-secret worker did not exit within 30 s"), pytrace=False)
    assert bad.returncode != 0, err
    assert "secret" in err, err

    rest = wait_all(m, len(expect) - len(wait_all_first), timeout=60)
    got = {**wait_all_first, **rest}
    assert {tid: t.output for tid, t in got.items()} == expect
    assert m.stats["workers"] == 2

    recs = close_and_check(m)
    closed = {r.get("peer"): r.get("reason", "") for r in recs if r.get("event") == "connection closed"}
    rejected = [r for r in recs if r.get("event") == "rejected"]
    assert peers["bad mac"] in closed and "secret" in closed[peers["bad mac"]]
    assert peers["bad mac"] in {r.get("peer") for r in rejected}
    assert "protocol error" in closed.get(peers["garbage"], ""), closed
    assert "exceeds the limit" in closed.get(peers["oversized"], ""), closed
    # bad MAC + the wrong-secret worker's two tries (a second rejection in a row rules out a manager
    # that was only stopping: it exits then, saying the secret is wrong)
    assert len(rejected) == 3, rejected
    assert len([r for r in recs if r.get("event") == "worker joined"]) == 2
    assert not [r for r in during_run(recs) if r.get("event") in ("worker lost", "requeued")]


def _answered_hello(m, roles=handshake.WORKER):
    """A raw socket to m and its handshake's answerer, the manager's hello read (next: hs.auth())."""
    s = _connect(m)
    hs = handshake.Answerer(m.secret, roles)
    got = b""
    while hs.receive_data(got) is None:
        got = s.recv(4096)
    return s, hs


def _authenticated_raw(m, roles=handshake.WORKER):
    """A raw socket that passed the real handshake (as a worker, or `roles`), nothing sent since."""
    s, hs = _answered_hello(m, roles)
    s.sendall(hs.auth())
    got = b""
    while hs.receive_data(got) is None:
        got = s.recv(4096)
    return s


def test_a_stranger_sending_a_deeply_nested_auth_is_dropped_and_the_manager_goes_on(tmp_path):
    """4 KiB of brackets in a field of the auth (before the secret is proven): that connection is
    closed as a protocol error, and the manager still authenticates the next peer."""
    m = vinehpc.Manager(run_dir=str(tmp_path / "run"), local_workers=0)
    try:
        s, _ = _answered_hello(m)
        deep = b"[" * 2000 + b"]" * 2000
        s.sendall(wire.head_of(messages.CODES["auth"], b'{"v":1,"nonce":' + deep + b',"mac":"m"}', ()))
        s.settimeout(30)
        try:
            assert s.recv(4096) == b""          # closed by the manager
        except ConnectionResetError:
            pass
        s.close()
        t = _authenticated_raw(m)               # the I/O thread is alive: a real handshake still passes
        t.close()
        assert m._server.error is None
    finally:
        m.close()


def _joined_raw_worker(m):
    """A raw socket that passes the real handshake and joins with valid info (a worker that sends
    whatever a test wants next)."""
    s = _authenticated_raw(m)
    s.sendall(messages.encode_bytes(messages.Info(cores=0, memory=0, disk=0, gpus=0, host="raw", pid=1, cached=[],
                                                  workdir="/nonexistent", version=wire.VERSION)))
    return s


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name, ctl, why", [
    ("result", {"id": [1], "status": "success", "wall": 0.1}, "field 'id'"),
    ("cached", {"cn": "x", "size": "12"}, "field 'size'"),
    ("result", {"id": 1, "status": "success", "wall": 0.1, "measured": [[1]]}, "field 'measured'"),
    ("error", {"reason": "r", "surprise": 1}, "unknown field"),
    ("file", {"cn": "../../escape", "off": 0, "last": True, "size": 1}, "plain file name"),
])
def test_malformed_message_from_an_authenticated_worker_drops_only_it(manager, name, ctl, why):
    m = manager
    expect = {m.submit(PythonTask(square, i)): i * i for i in range(40)}
    s = _joined_raw_worker(m)
    m.wait_for_workers(3, timeout=20)
    frames = [b"x"] if name == "file" else []
    s.sendall(wire.encode_bytes(messages.CODES[name], ctl, frames))
    assert _closed_by_manager(s)[0], "the manager kept a connection that sent a malformed %s" % name
    got = wait_all(m, len(expect), timeout=60)
    assert {tid: t.output for tid, t in got.items()} == expect
    recs = close_and_check(m)
    lost = [r for r in recs if r.get("event") == "worker lost" and r.get("host") == "raw"]
    assert lost and "protocol error" in lost[0]["reason"] and why in lost[0]["reason"], lost
    assert not os.path.exists(os.path.join(m.run_dir, "escape"))


# ====================================================================== 6. failures are data
@pytest.mark.timeout(60)
def test_missing_command_fails_with_127_and_others_go_on(manager):
    m = manager
    bad = m.submit(Task("no-such-command-vinehpc-xyz --flag"))
    good = [m.submit(Task("echo ok %d" % i)) for i in range(20)]
    got = wait_all(m, 21, timeout=30)
    t = got[bad]
    assert not t.successful()
    assert t.exit_code == 127
    assert "not found" in t.std_output
    for tid in good:
        assert got[tid].successful() and got[tid].std_output.strip().startswith("ok"), got[tid].reason


@pytest.mark.timeout(60)
def test_time_max_kills_a_long_task_quickly(manager):
    m = manager
    t = Task("sleep 30").set_time_max(1)
    py = PythonTask(time.sleep, 30).set_time_max(1)
    t0 = time.monotonic()
    m.submit(t)
    m.submit(py)
    got = wait_all(m, 2, timeout=25)
    elapsed = time.monotonic() - t0
    assert got[t.id] is t
    for x in (t, py):
        assert x.result == "resource exhaustion", (x.result, x.reason)     # over its time allocation
        assert x.reason.startswith("time: ") and "> 1 s allocated" in x.reason, x.reason
        assert not x.successful()
    assert 0.9 <= elapsed < 10, elapsed


@pytest.mark.timeout(60)
def test_python_exception_chain_task_error_value_error_remote_traceback(manager):
    m = manager
    t = PythonTask(raise_value_error_for_test, 7)
    m.submit(t)
    wait_all(m, 1, timeout=30)
    assert t.output is t.exception          # TaskVine: output is the exception the function raised
    with pytest.raises(TaskError) as ei:
        t.output_or_raise()
    ve = ei.value.__cause__
    assert isinstance(ve, ValueError) and "bad value 7" in str(ve)
    assert t.exception is ve
    rtb = ve.__cause__
    assert isinstance(rtb, RemoteTraceback)
    assert "raise_value_error_for_test" in str(rtb)
    assert "ValueError" in str(rtb)


@pytest.mark.timeout(60)
def test_python_task_that_raises_is_a_failure_and_is_retried(manager):
    m = manager
    t = PythonTask(raise_value_error_for_test, 7).set_retries(1)
    m.submit(t)
    wait_all(m, 1, timeout=30)
    recs = close_and_check(m)
    assert isinstance(t.exception, ValueError)
    assert not t.successful()
    assert t.result == "failed"
    assert by_task(recs, "failed")[t.id] == 1 and by_task(recs, "done")[t.id] == 0
    assert [r.get("attempt") for r in recs if r.get("event") == "retry" and r.get("task") == t.id] == [1]


@pytest.mark.timeout(60)
def test_retries_are_journaled_for_a_missing_output(manager, tmp_path):
    m = manager
    t = Task("true").set_retries(2)
    t.add_output(m.declare_file(tmp_path / "never.txt"), "never.txt")
    m.submit(t)
    wait_all(m, 1, timeout=30)
    assert t.result == "output missing" and not t.successful()
    assert t.attempts == 3
    recs = close_and_check(m)
    retries = [r for r in recs if r.get("event") == "retry" and r.get("task") == t.id]
    assert [r.get("attempt") for r in retries] == [1, 2]
    assert by_task(recs, "failed")[t.id] == 1


@pytest.mark.timeout(60)
def test_retries_are_journaled_for_a_failing_command(manager):
    m = manager
    t = Task("exit 3").set_retries(2)
    m.submit(t)
    wait_all(m, 1, timeout=30)
    assert not t.successful()
    assert t.exit_code == 3
    recs = close_and_check(m)
    retries = [r for r in recs if r.get("event") == "retry" and r.get("task") == t.id]
    assert [r.get("attempt") for r in retries] == [1, 2]
    assert t.attempts == 3
    assert t.result == "success" and t.completed()     # TaskVine: it ran to its end; the code is in exit_code
    assert by_task(recs, "failed")[t.id] == 1          # journaled as not successful


@pytest.mark.timeout(60)
def test_drain_cuts_what_still_runs_then_wait_raises_resumable(make_manager):
    m = make_manager(local_workers=1)
    m.wait_for_workers(1, timeout=30)
    running = m.submit(Task("sleep 30"))
    m.submit(Task("true"))                       # never starts: the only core is taken
    poll(lambda: read_journal(m, "dispatched"), 20, "the sleep to start", m=m)
    m.drain(0.5)
    # the task still running when the grace ends is cut: "not run" (a resubmission runs it), never
    # handed back as a failure; both tasks are counted as not run
    with pytest.raises(vinehpc.Resumable, match="2 task"):
        m.wait(timeout=20)
    drained = poll(lambda: read_journal(m, "drained"), 10, "the drained record", m=m)
    assert drained[0]["not run"] == 2 and drained[0]["cut"] == [running]
    assert [r["task"] for r in read_journal(m, "not run")] == [running]
    assert read_journal(m, "failed") == []


# ====================================================================== 7. Executor
@pytest.fixture
def executor(tmp_path):
    ex = vinehpc.Executor(max_workers=2, run_dir=str(tmp_path / "exrun"))
    try:
        ex.manager.wait_for_workers(2, timeout=30)
        yield ex
    finally:
        tree = process_tree(ex.manager._local.pids())
        ex.shutdown(wait=True, cancel_futures=True)
        assert_no_survivors(tree, timeout=15, what="executor worker processes after shutdown")


@pytest.mark.timeout(60)
def test_executor_map_equals_local(executor):
    items = list(range(200))
    assert list(executor.map(square, items, timeout=60)) == [square(x) for x in items]


@pytest.mark.timeout(60)
def test_executor_reraises_remote_exception_as_itself(executor):
    fut = executor.submit(raise_value_error_for_test, "x")
    with pytest.raises(ValueError, match="bad value 'x'") as ei:
        fut.result(timeout=30)
    assert type(ei.value) is ValueError
    assert isinstance(ei.value.__cause__, RemoteTraceback)
    assert "raise_value_error_for_test" in str(ei.value.__cause__)


@pytest.mark.timeout(60)
def test_executor_as_completed_yields_in_completion_order(executor):
    slow = executor.submit(sleepy_square, 1000, 2.0)
    fast = [executor.submit(sleepy_square, i, 0.001) for i in range(20)]
    order = list(cf.as_completed([slow] + fast, timeout=60))
    assert set(order) == {slow, *fast} and len(order) == 21
    # the 2 s call was submitted first but finishes after most of the others (a few fast
    # ones may be queued behind it on its worker)
    assert order.index(slow) >= 10, order.index(slow)
    assert [f.result() for f in fast] == [i * i for i in range(20)]
    assert slow.result() == 1000 * 1000


@pytest.mark.timeout(60)
def test_executor_future_runs_when_dispatched_and_then_cannot_be_cancelled(executor):
    running = [executor.submit(sleepy_square, i, 2.0) for i in range(2)]     # one per worker
    poll(lambda: all(f.running() for f in running), 20, "the futures to be RUNNING", m=executor.manager)
    assert not any(f.done() for f in running)              # running, not finished
    assert [f.cancel() for f in running] == [False, False]
    assert [f.result(timeout=30) for f in running] == [0, 1]


@pytest.mark.timeout(60)
def test_executor_cancel_of_a_pending_future_withdraws_its_task(executor):
    m = executor.manager
    busy = [executor.submit(sleepy_square, i, 2.0) for i in range(2)]        # both workers taken
    poll(lambda: all(f.running() for f in busy), 20, "both workers to be busy", m=m)
    pending = executor.submit(sleepy_square, 7, 0.0)
    assert not pending.running() and pending.cancel() and pending.cancelled()
    recs = poll(lambda: [r for r in read_journal(m, "failed") if r.get("result") == "cancelled"], 20,
                "the withdrawn task in the journal", m=m)
    assert len(recs) == 1
    assert [f.result(timeout=30) for f in busy] == [0, 1]
    assert not [r for r in read_journal(m, "dispatched") if r["task"] == recs[0]["task"]]   # never ran


# ====================================================================== 8. standalone workers
@pytest.mark.timeout(60)
def test_standalone_worker_joins_and_runs_tasks(make_manager, spawned):
    m = make_manager(port=0)
    w = start_worker(spawned, m)
    m.wait_for_workers(1, timeout=30)
    ids = [m.submit(PythonTask(square, i)) for i in range(20)] + [m.submit(Task("echo hi"))]
    got = wait_all(m, len(ids), timeout=30)
    assert all(t.successful() for t in got.values())
    assert [got[i].output for i in ids[:20]] == [i * i for i in range(20)]
    assert {t.worker for t in got.values()} == {read_journal(m, "worker joined")[0]["worker"]}
    m.close()
    assert w.wait(15) == 0     # the manager said exit


@pytest.mark.timeout(90)
def test_worker_joining_later_takes_work(make_manager, spawned):
    m = make_manager(port=0)
    start_worker(spawned, m)
    m.wait_for_workers(1, timeout=30)
    expect = {m.submit(PythonTask(sleepy_square, i, 0.02)): i * i for i in range(200)}
    first = wait_all(m, 10, timeout=30)
    start_worker(spawned, m)
    m.wait_for_workers(2, timeout=30)
    rest = wait_all(m, len(expect) - len(first), timeout=60)
    got = {**first, **rest}
    assert {tid: t.output for tid, t in got.items()} == expect
    wids = [r["worker"] for r in read_journal(m, "worker joined")]
    assert len(wids) == 2
    assert wids[1] in {t.worker for t in rest.values()}, "the late worker ran nothing"


@pytest.mark.timeout(90)
def test_worker_leaving_during_the_run_loses_nothing(make_manager, spawned):
    m = make_manager(port=0)
    w1, w2 = start_worker(spawned, m), start_worker(spawned, m)
    m.wait_for_workers(2, timeout=30)
    expect = {m.submit(PythonTask(sleepy_square, i, 0.01)): i * i for i in range(300)}
    first = wait_all(m, 40, timeout=30)
    w1.terminate()
    try:
        w1.wait(15)
    except subprocess.TimeoutExpired:
        pytest.fail(diagnose(m, "worker did not exit within 15 s of SIGTERM"), pytrace=False)
    rest = wait_all(m, len(expect) - len(first), timeout=60)
    assert not set(first) & set(rest)
    got = {**first, **rest}
    assert {tid: t.output for tid, t in got.items()} == expect
    recs = close_and_check(m)
    assert len([r for r in during_run(recs) if r.get("event") == "worker lost"]) == 1
    done = by_task(recs, "done")
    assert [tid for tid in expect if done[tid] != 1] == []
    assert w2.wait(15) == 0


@pytest.mark.timeout(90)
def test_started_records_follow_pipelining(make_manager, spawned):
    """One worker of 1 core: a task sent with room starts at its dispatch; three pipelined short
    tasks start in order, each as the one before it ended (the worker tells the manager)."""
    from vinehpc.core.placement import SHORT_SAMPLES
    m = make_manager(port=0)
    start_worker(spawned, m)
    m.wait_for_workers(1, timeout=30)

    def one(category, *args):
        t = PythonTask(sleepy_square, *args)
        t.set_category(category)
        tid = m.submit(t)
        assert wait_all(m, 1, timeout=30)[tid].successful()
        return tid

    first = one("first", 3, 0.0)                 # warms the interpreter up, too
    for i in range(SHORT_SAMPLES):                # "quick" becomes a short category: sent pipelined
        one("quick", i, 0.0)
    ids = []
    for i in range(3):
        t = PythonTask(sleepy_square, i, 0.05)
        t.set_category("quick")
        ids.append(m.submit(t))
    wait_all(m, 3, timeout=30)
    recs = read_journal(m)
    at = {(r["event"], r.get("task")): (i, r) for i, r in enumerate(recs)
          if r.get("event") in ("dispatched", "started", "done")}
    # sent with room: started as dispatched, nothing asked of the worker
    (i_d, d), (i_s, s) = at["dispatched", first], at["started", first]
    assert i_s == i_d + 1 and s["queued"] is False and s["time"] - d["time"] < 0.01 and s["attempt"] == 1
    # the first fits the idle worker (started at dispatch); the others are sent ahead: each started
    # as reported, in order, after its dispatch and after the previous one's end
    starts = [at["started", t] for t in ids]
    assert [r["queued"] for _, r in starts] == [False, True, True], starts
    assert all(r["worker"] == s["worker"] for _, r in starts)
    assert [i for i, _ in starts] == sorted(i for i, _ in starts)
    for k, t in enumerate(ids):
        i, r = starts[k]
        assert r["time"] >= at["dispatched", t][1]["time"] and i > at["dispatched", t][0]
        if k:
            i_end, end = at["done", ids[k - 1]]
            assert i > i_end and r["time"] >= end["time"], (recs[i_end], r)
    assert m.stats.tasks_running == 0 and m.stats.tasks_on_workers == 0


# ====================================================================== 9. vinehpc run
def vinehpc_run(tmp_path, *args, timeout=120, **kw):
    env = dict(os.environ, VINEHPC_RUN_DIR=str(tmp_path / "runs"), VINEHPC_PROGRESS="never")
    env.pop("VINEHPC_SECRET", None)
    try:
        return subprocess.run([sys.executable, "-m", "vinehpc", "run", *args], cwd=REPO, env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as e:
        pytest.fail("vinehpc run %s did not end within %s s\nstdout: %s\nstderr: %s"
                    % (args, timeout, e.stdout, e.stderr), pytrace=False)


# The script waits until its workers run a Python task and a `sleep`, records every
# descendant of its own process (pid, create time), then ends the way argv[2] says.
ENDING_SCRIPT = textwrap.dedent("""
    import json, sys, time
    import psutil
    import vinehpc
    from vinehpc import Manager, PythonTask, Task

    m = Manager()
    t = PythonTask(pow, 2, 10)
    m.submit(t)
    m.submit(Task("sleep 60"))
    done = m.wait(30)
    assert done is t and t.output == 1024, done
    me = psutil.Process()
    deadline = time.monotonic() + 30
    while not any(p.name() == "sleep" for p in me.children(recursive=True)):
        assert time.monotonic() < deadline, "sleep never started"
        time.sleep(0.05)
    with open(sys.argv[1], "w") as f:
        json.dump([[p.pid, p.create_time()] for p in me.children(recursive=True)], f)
    if sys.argv[2] == "raise":
        raise RuntimeError("boom from the user script")
    sys.exit(int(sys.argv[2]))
""")


def describe(procs) -> str:
    out = []
    for q in procs:
        try:
            out.append("%d %s %s" % (q.pid, q.status(), " ".join(q.cmdline())[:160]))
        except psutil.Error:
            out.append("%d gone" % q.pid)
    return "\n".join(out)


def recorded_tree(path):
    out = []
    for pid, ctime in json.loads(path.read_text()):
        try:
            p = psutil.Process(pid)
        except psutil.NoSuchProcess:
            continue
        if abs(p.create_time() - ctime) < 0.01:    # not a recycled pid
            out.append(p)
    return out


@pytest.mark.timeout(120)
def test_run_example_script_exits_0(tmp_path):
    r = vinehpc_run(tmp_path, "-n", "2", "examples/tasks.py", "2000")
    assert r.returncode == 0, r.stderr
    assert "pi ~" in r.stdout


@pytest.mark.timeout(90)
def test_run_script_that_raises_exits_nonzero_and_leaves_no_process(tmp_path):
    script = tmp_path / "raises.py"
    script.write_text(ENDING_SCRIPT)
    tree_file = tmp_path / "tree.json"
    r = vinehpc_run(tmp_path, "-n", "2", str(script), str(tree_file), "raise", timeout=60)
    assert r.returncode != 0
    assert "Traceback" in r.stderr and "RuntimeError: boom from the user script" in r.stderr
    names = json.loads(tree_file.read_text())
    assert len(names) >= 4           # 2 workers, a pyrunner, sh/sleep
    assert_no_survivors(recorded_tree(tree_file), timeout=10, what="processes started by `vinehpc run`")


@pytest.mark.timeout(90)
def test_run_script_exit_code_is_passed_through(tmp_path):
    script = tmp_path / "exits.py"
    script.write_text(ENDING_SCRIPT)
    tree_file = tmp_path / "tree.json"
    r = vinehpc_run(tmp_path, "-n", "2", str(script), str(tree_file), "3", timeout=60)
    assert r.returncode == 3, r.stderr
    assert_no_survivors(recorded_tree(tree_file), timeout=10, what="processes started by `vinehpc run`")


@pytest.mark.timeout(60)
def test_run_missing_script_exits_2_naming_it(tmp_path):
    missing = tmp_path / "no_such_script_here.py"
    r = vinehpc_run(tmp_path, "-n", "1", str(missing), timeout=30)
    assert r.returncode == 2
    assert str(missing) in r.stderr


CTRL_C_SCRIPT = textwrap.dedent("""
    import vinehpc
    from vinehpc import Manager, Task
    m = Manager()
    for _ in range(4):
        m.submit(Task("sleep 60"))
    while not m.empty():
        m.wait(5)
""")


@pytest.mark.timeout(90)
def test_ctrl_c_stops_run_with_130_and_leaves_no_process(tmp_path):
    script = tmp_path / "long.py"
    script.write_text(CTRL_C_SCRIPT)
    runs = tmp_path / "runs"
    env = dict(os.environ, VINEHPC_RUN_DIR=str(runs), VINEHPC_PROGRESS="never", PYTHONFAULTHANDLER="1")
    env.pop("VINEHPC_SECRET", None)
    # A shell without job control starts background jobs with SIGINT ignored, and exec keeps
    # an ignored signal ignored: hand the child a default disposition whatever ours is.
    prev = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        p = subprocess.Popen([sys.executable, "-m", "vinehpc", "run", "-n", "2", str(script)], cwd=REPO, env=env,
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    finally:
        signal.signal(signal.SIGINT, prev)
    try:
        def dispatched():
            for j in runs.glob("*/transactions.jsonl"):
                if read_journal(j.parent, "dispatched"):
                    return True
            return p.poll() is not None        # ended early: fail below with its output

        poll(dispatched, 30, "a dispatched task in %s" % runs)
        assert p.poll() is None, p.communicate()

        tree = poll(lambda: tree_running([p.pid], "sleep", 2), 30, "two running sleep tasks")
        names = collections.Counter(q.name() for q in tree)
        assert names["sleep"] == 2 and len(tree) >= 5, names      # run, 2 workers, (2 sh,) 2 sleep
        os.killpg(os.getpgid(p.pid), signal.SIGINT)
        try:
            out, err = p.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            alive = describe(tree)
            p.send_signal(signal.SIGABRT)          # faulthandler: every thread's traceback on stderr
            out, err = p.communicate(timeout=10)
            pytest.fail("vinehpc run did not exit within 20 s of SIGINT\nits processes then:\n%s\nstderr:\n%s"
                        % (alive, err), pytrace=False)
        assert p.returncode == 130, err
        assert_no_survivors(tree, timeout=10, what="processes of an interrupted `vinehpc run`")
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)


TUNNEL_SCRIPT = textwrap.dedent("""
    import os
    from vinehpc import Manager, PythonTask, Task
    def proxy_vars():
        return {k: os.environ.get(k, "") for k in ("ALL_PROXY", "HTTPS_PROXY", "http_proxy", "NO_PROXY")}
    m = Manager()
    t = Task("printf '%s' \\"$ALL_PROXY\\"")
    p = PythonTask(proxy_vars)
    m.submit(t); m.submit(p)
    for _ in range(2):
        assert m.wait(30) is not None
    assert t.successful() and t.std_output.startswith("socks5h://") and t.std_output.count("@127.0.0.1:") == 1, t.std_output
    v = p.output
    assert v["HTTPS_PROXY"].startswith("http://") and "@127.0.0.1:" in v["http_proxy"], v
    assert "127.0.0.1" in v["NO_PROXY"].split(","), v
    print("tunnel variables ok")
""")


@pytest.mark.timeout(90)
def test_vinehpc_run_tunnel_gives_tasks_proxy_variables(tmp_path):
    script = tmp_path / "tunnel_vars.py"
    script.write_text(TUNNEL_SCRIPT)
    p = vinehpc_run(tmp_path, "-n", "1", "--tunnel", str(script))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "tunnel variables ok" in p.stdout
    p = vinehpc_run(tmp_path, "-n", "1", str(script))            # without --tunnel: no variables
    assert p.returncode != 0 and "socks5h" not in p.stdout
