"""Worker-to-worker transfers (issue 16): the core's choice of sources by events (fast), then real
manager and worker processes over real TCP: a fan-out as a tree, a source killed mid-transfer, a
stranger at a worker's transfer port, a corrupt copy, temps moving peer to peer.
"""
from __future__ import annotations

import collections
import hashlib
import os
import signal
import socket
import time

import pytest

import vinehpc
from vinehpc import Task
from vinehpc.core.commands import Fetch, KillTask, PutFile, SendTask
from vinehpc.core.events import FileCached, TransferDone, WorkerLost
from vinehpc.file import Temp
from vinehpc.protocol import auth, messages, wire
from vinehpc.worker.events import (FetchPeer, FetchRequested, FileFailed, FileStored, Input, PeerFetched,
                                   SendFetched, SendResult, StartTask, TaskReceived, TaskSpec)
from vinehpc.worker.state import WorkerState

from conftest import diagnose, poll, read_journal, wait_all
from test_core import Sim, infile_factory, logs, new_task, of


# ====================================================================== the core, by events
@pytest.fixture
def infile(tmp_path):
    return infile_factory(tmp_path)


def join_all(sim, n, host="h1"):
    for wid in range(1, n + 1):
        sim.join(wid, cores=1, port=40000 + wid, addr="10.0.0.%d:5000" % wid, host=host)


def fetches(cmds):
    return sorted((c.wid, c.port - 40000) for c in of(cmds, Fetch))     # (dest, source)


def test_manager_sends_one_copy_and_the_copies_fan_out_as_a_tree(infile):
    sim = Sim()
    sim.core.transfers.limit = 1
    f = infile(cache=True)
    n = f.cachename()
    join_all(sim, 4)
    for wid in range(1, 5):
        sim.submit(new_task().add_input(f, "in"), pin=wid)
    sim.schedule()
    cmds = sim.take()
    assert [(c.wid, c.ack) for c in of(cmds, PutFile)] == [(1, True)]   # the manager: one copy, acknowledged
    # limit 1: one copy from each source, none more from the manager; a worker still receiving
    # serves what has arrived, so the copies flow down a chain at once
    assert fetches(cmds) == [(2, 1), (3, 2), (4, 3)] and len(of(cmds, SendTask)) == 4
    assert [c.spec.get("expect") for c in of(cmds, SendTask)] == [[n]] * 4   # they wait on their worker
    sim(FileCached(1, n, 10))
    assert fetches(sim.take()) == []
    sim(TransferDone(2, n, True, 10, 0.1))
    sim(TransferDone(3, n, True, 10, 0.1))
    sim(TransferDone(4, n, True, 10, 0.1))
    recs = logs(sim.take(), "transfer")
    assert [(r["source"], r["dest"]) for r in recs] == [(1, 2), (2, 3), (3, 4)]
    assert sim.core.transfers.wants == {} and sim.core.transfers.active == {}
    assert sim.core.replicas[n] == {1, 2, 3, 4}


def holds(sim, n, *wids):
    """Workers `wids` hold a complete copy of file n (the core's two records of it)."""
    sim.core.replicas[n] |= set(wids)
    for w in wids:
        sim.core.workers[w].cached.add(n)


def test_a_burst_from_one_complete_copy_becomes_a_chain_of_streaming_copies(infile):
    # default limit (3): the holder could serve three at once, each at a third of its uplink; a
    # copy still arriving is an idle source at the full rate, so each source serves one
    sim = Sim()
    f = infile(cache=True)
    n = f.cachename()
    join_all(sim, 5)
    holds(sim, n, 1)
    for wid in range(2, 6):
        sim.submit(new_task().add_input(f, "in"), pin=wid)
    sim.schedule()
    cmds = sim.take()
    assert fetches(cmds) == [(2, 1), (3, 2), (4, 3), (5, 4)] and not of(cmds, PutFile)
    # a source that dies mid-chain: its receiver, asked again, is never given a worker that
    # receives the file through it (4 gets it from 3, which gets it from 2: a cycle)
    sim(TransferDone(2, n, False, reason="the peer closed the connection"))
    cmds = sim.take()
    assert fetches(cmds) == [] and not of(cmds, PutFile)      # waits: 1 failed it, 3..5 are fed by 2
    sim(TransferDone(3, n, False, reason="the copy it was receiving failed"))
    assert (3, 1) in fetches(sim.take())                       # 3 is not fed by 2 any more: 1 serves it
    assert_no_cycle(sim.core.transfers, n)
    for dest in (4, 5):
        sim(TransferDone(dest, n, False, reason="the copy it was receiving failed"))
        assert_no_cycle(sim.core.transfers, n)


def assert_no_cycle(t, n):
    for (m, dest), want in t.wants.items():
        seen, h = {dest}, want.source
        while m == n and h not in (None, "manager") and (n, h) in t.wants:
            assert h not in seen, "a cycle of transfers: %s" % seen
            seen.add(h)
            h = t.wants[(n, h)].source


def test_same_host_source_preferred(infile):
    sim = Sim()
    f = infile(cache=True)
    n = f.cachename()
    sim.join(1, port=40001, addr="10.0.0.1:1", host="a")
    sim.join(2, port=40002, addr="10.0.0.2:1", host="b")
    sim.join(3, port=40003, addr="10.0.0.3:1", host="b")
    holds(sim, n, 1, 2)
    sim.submit(new_task().add_input(f, "in"), pin=3)
    sim.schedule()
    assert fetches(sim.take()) == [(3, 2)]


def test_failed_transfer_is_asked_of_another_source_then_the_manager_without_a_retry(infile):
    sim = Sim()
    f = infile(cache=True)
    n = f.cachename()
    join_all(sim, 3)
    holds(sim, n, 1)
    t = sim.submit(new_task().add_input(f, "in"), pin=3)
    t.set_retries(0)
    sim.schedule()
    assert fetches(sim.take()) == [(3, 1)]
    sim(TransferDone(3, n, False, reason="corrupt copy"))
    cmds = sim.take()
    assert [c.wid for c in of(cmds, PutFile)] == [3] and fetches(cmds) == []   # no other holder: the manager
    assert logs(cmds, "transfer failed")[0]["reason"] == "corrupt copy"
    sim(FileCached(3, n, 10))
    assert sim.state(t) == "running" and sim.ts(t).tries == 0


def test_temp_lost_with_its_only_holder_mid_transfer_requeues_and_reruns_its_producer():
    sim = Sim()
    join_all(sim, 2)
    temp = Temp()
    prod = new_task().add_output(temp, "out")
    sim.submit(prod, pin=1)
    sim.schedule()
    sim.take()
    sim.ok(1, prod, temps=[temp.cachename()], sums={temp.cachename(): [5, "sha256:" + "0" * 32]})
    cons = sim.submit(new_task().add_input(temp, "in"), pin=2)
    sim.schedule()
    assert fetches(sim.take()) == [(2, 1)]      # a temp made on worker 1 goes worker to worker
    sim(WorkerLost(1, "killed"))
    sim(TransferDone(2, temp.cachename(), False, reason="the peer closed the connection"))
    cmds = sim.take()
    assert [c.tid for c in of(cmds, KillTask)] == [cons.id]      # no copy left: back to the queue...
    assert sim.state(cons) == "ready" and sim.ts(cons).tries == 0     # ...without spending a retry
    sim.schedule()
    assert logs(sim.take(), "recreate")                           # and its producer runs again


def test_temp_kept_elsewhere_survives_its_producer_worker(infile):
    sim = Sim()
    join_all(sim, 3)
    temp = Temp()
    n = temp.cachename()
    prod = new_task().add_output(temp, "out")
    sim.submit(prod, pin=1)
    sim.schedule()
    sim.ok(1, prod, temps=[n], sums={n: [5, "sha256:" + "0" * 32]})
    a = sim.submit(new_task().add_input(temp, "in"), pin=2)
    sim.schedule()
    sim(TransferDone(2, n, True, 5, 0.01))
    sim.ok(2, a)
    sim(WorkerLost(1, "killed"))
    sim.take()
    sim.submit(new_task().add_input(temp, "in"), pin=3)
    sim.schedule()
    cmds = sim.take()
    assert fetches(cmds) == [(3, 2)] and not logs(cmds, "recreate")    # the copy on 2: no re-run


def test_peer_transfers_off_puts_from_the_manager(infile):
    sim = Sim()
    sim.core.transfers.enabled = False
    f = infile(cache=True)
    join_all(sim, 2)
    for wid in (1, 2):
        sim.submit(new_task().add_input(f, "in"), pin=wid)
    sim.schedule()
    cmds = sim.take()
    assert sorted((c.wid, c.ack) for c in of(cmds, PutFile)) == [(1, False), (2, False)] and not of(cmds, Fetch)


# ====================================================================== real processes
def joined(m):
    """wid -> the `worker joined` record (pid, port, log)."""
    return {r["worker"]: r for r in read_journal(m, "worker joined")}


def cache_dir(rec):
    return os.path.join(os.path.dirname(rec["log"]), "cache")


def md5(path):
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


def run_pinned(m, f, wid, cmd="md5sum in"):
    t = Task(cmd)
    t.add_input(f, "in")
    t.set_retries(0)        # a transfer's failure must never cost a retry: none to spend
    m.submit(t, worker=wid)
    return t


def read_to_eof(s) -> bytes:
    got = b""
    try:
        while True:
            data = s.recv(65536)
            if not data:
                return got
            got += data
    except ConnectionResetError:
        return got


def ready(make_manager, n):
    m = make_manager(local_workers=n)
    try:
        m.wait_for_workers(n, timeout=60)
    except TimeoutError as e:
        pytest.fail(diagnose(m, str(e)), pytrace=False)
    return m


@pytest.mark.timeout(120)
def test_fan_out_to_eight_workers_with_a_source_limit_of_one_is_a_tree(make_manager, tmp_path):
    m = ready(make_manager, 8)
    m.set_file_source_max_transfers(1)
    src = tmp_path / "in.bin"
    src.write_bytes(os.urandom(16 << 20))
    f = m.declare_file(src, cache=True)
    for wid in joined(m):
        run_pinned(m, f, wid)
    got = wait_all(m, 8, timeout=90)
    want = md5(src)
    assert all(t.successful() and t.std_output.split()[0] == want for t in got.values()), \
        [(t.id, t.result, t.reason) for t in got.values()]
    recs = [r for r in read_journal(m, "transfer") if r["file"] == f.cachename()]
    assert sorted(r["dest"] for r in recs) == sorted(joined(m))          # each worker received it once
    assert [r["source"] for r in recs].count("manager") == 1            # the manager's link: one copy
    received = {r["dest"]: r for r in recs}
    # a tree (limit 1: a chain): some worker served a copy it got from a peer; no source served two at once
    assert any(received[r["source"]]["source"] != "manager" for r in recs if r["source"] != "manager")
    spans = collections.defaultdict(list)
    for r in recs:
        spans[r["source"]].append((r["time"] - r["secs"], r["time"]))
    for s in spans.values():
        s.sort()
        assert all(b[0] >= a[1] - 0.05 for a, b in zip(s, s[1:])), s      # (clock slack: the worker's secs)
    assert all(r["bytes"] == 16 << 20 for r in recs)
    # a worker served the file while it was still arriving: a copy from it began before its own ended
    assert any(received[r["source"]]["time"] > r["time"] - r["secs"] for r in recs if r["source"] != "manager")


def first_holds(make_manager, tmp_path, size, timeout):
    """Two workers a < b; a cached input of `size` random bytes that worker a holds (from the
    manager). Returns (m, a, b, the file)."""
    m = ready(make_manager, 2)
    a, b = sorted(joined(m))
    src = tmp_path / "in.bin"
    src.write_bytes(os.urandom(size))
    f = m.declare_file(src, cache=True)
    run_pinned(m, f, a)
    wait_all(m, 1, timeout=timeout)
    return m, a, b, f


@pytest.mark.timeout(120)
def test_source_killed_mid_transfer_the_task_still_succeeds_without_a_retry(make_manager, tmp_path):
    m, a, b, f = first_holds(make_manager, tmp_path, 128 << 20, 60)
    part = os.path.join(cache_dir(joined(m)[b]), ".peer-" + f.cachename())
    t = run_pinned(m, f, b)                                          # b gets it from a...
    poll(lambda: os.path.exists(part), 30, "worker %s's fetch from worker %s to begin" % (b, a), interval=0.001, m=m)
    pid_a, pid_b = joined(m)[a]["pid"], joined(m)[b]["pid"]
    os.kill(pid_b, signal.SIGSTOP)           # ...which stops receiving: a is stuck mid-file, its socket full
    try:
        time.sleep(0.3)
        os.kill(pid_a, signal.SIGKILL)       # the source dies mid-transfer
    finally:
        os.kill(pid_b, signal.SIGCONT)
    (done,) = wait_all(m, 1, timeout=60).values()
    assert done is t and t.successful() and t.attempts == 1, (t.result, t.reason, t.attempts)
    assert t.std_output.split()[0] == md5(tmp_path / "in.bin")
    recs = read_journal(m)
    failed = [r for r in recs if r["event"] == "transfer failed" and r["dest"] == b]
    assert failed and failed[0]["source"] == a, failed
    assert [r["source"] for r in recs if r["event"] == "transfer" and r["dest"] == b] == ["manager"]
    assert not [r for r in recs if r["event"] in ("retry", "requeued", "failed")]


@pytest.mark.timeout(120)
def test_source_stalled_mid_transfer_is_given_up_and_served_by_another(make_manager, tmp_path, monkeypatch):
    monkeypatch.setenv("VINEHPC_TRANSFER_STALL", "1")       # the workers' setting: give up after 1 s of silence
    m, a, b, f = first_holds(make_manager, tmp_path, 128 << 20, 60)
    part = os.path.join(cache_dir(joined(m)[b]), ".peer-" + f.cachename())
    t = run_pinned(m, f, b)
    poll(lambda: os.path.exists(part), 30, "worker %s's fetch from worker %s to begin" % (b, a), interval=0.001, m=m)
    pid_a = joined(m)[a]["pid"]
    os.kill(pid_a, signal.SIGSTOP)           # the source hangs mid-file (and stays connected to the manager)
    try:
        (done,) = wait_all(m, 1, timeout=60).values()
    finally:
        os.kill(pid_a, signal.SIGCONT)
    refetched_from_the_manager(m, done, t, tmp_path, a, b, "stalled")


def refetched_from_the_manager(m, done, t, tmp_path, a, b, why):
    """Task t (the one that ended: `done`) succeeded at its first attempt with in.bin's bytes on
    worker b, after b's transfer from a failed with `why` in its reason and the manager sent it."""
    assert done is t and t.successful() and t.attempts == 1, (t.result, t.reason)
    assert t.std_output.split()[0] == md5(tmp_path / "in.bin")
    recs = read_journal(m)
    failed = [r for r in recs if r["event"] == "transfer failed" and r["dest"] == b]
    assert failed and failed[0]["source"] == a and why in failed[0]["reason"], failed
    assert [r["source"] for r in recs if r["event"] == "transfer" and r["dest"] == b] == ["manager"]


@pytest.mark.timeout(60)
def test_stranger_without_the_secret_is_refused_at_the_transfer_port(make_manager, tmp_path):
    m = ready(make_manager, 1)
    src = tmp_path / "in.bin"
    src.write_bytes(b"secret data" * 1000)
    f = m.declare_file(src, cache=True)
    run_pinned(m, f, 1)
    wait_all(m, 1, timeout=30)
    port = m.workers()[0]["port"]
    # a peer that knows the protocol but not the secret: the hello, then nothing
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        dec = messages.decoder(max_ctl=wire.PREAUTH_MAX_CTL, allow_frames=False)
        hello = None
        while hello is None:
            dec.push(s.recv(4096))
            hello = dec.next_message()
        assert hello[0] == "hello" and hello[1]["role"] == "peer"
        s.sendall(messages.encode_bytes(messages.Auth(v=wire.VERSION, nonce=auth.nonce(), mac="0" * 64))
                  + messages.encode_bytes(messages.Want(cn=f.cachename())))
        assert read_to_eof(s) == b""            # closed without a byte (no welcome, nothing of the file)
    # one that skips the handshake
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(messages.encode_bytes(messages.Want(cn=f.cachename())))
        got = read_to_eof(s)
    assert b"secret data" not in got and messages.decoder().feed(got)[0][0] == "hello"
    def refusals():
        recs = [r for r in read_journal(m, "worker error") if "refused a transfer" in r["reason"]]
        return recs if len(recs) >= 2 else None
    recs = poll(refusals, 15, "both refusals in the journal", m=m)
    assert len(recs) == 2 and "wrong secret" in recs[0]["reason"] and "expected auth" in recs[1]["reason"], recs


@pytest.mark.timeout(90)
def test_corrupt_copy_is_detected_and_fetched_again(make_manager, tmp_path):
    m, a, b, f = first_holds(make_manager, tmp_path, 1 << 20, 30)
    held = os.path.join(cache_dir(joined(m)[a]), f.cachename())
    os.chmod(held, 0o644)
    with open(held, "r+b") as fh:            # a bit flips on worker a's disk
        c = fh.read(1)
        fh.seek(0)
        fh.write(bytes([c[0] ^ 1]))
    t = run_pinned(m, f, b)
    (done,) = wait_all(m, 1, timeout=60).values()
    refetched_from_the_manager(m, done, t, tmp_path, a, b, "corrupt")      # the good copy, never the corrupt one


@pytest.mark.timeout(120)
def test_a_corrupt_copy_streamed_down_a_chain_is_used_nowhere(make_manager, tmp_path):
    # copies are passed on while they arrive, before their digest is checked: every worker checks
    # its own, so a bad byte that went down the chain fails every copy it reached
    m = ready(make_manager, 4)
    a, *rest = sorted(joined(m))
    src = tmp_path / "in.bin"
    src.write_bytes(os.urandom(16 << 20))
    f = m.declare_file(src, cache=True)
    run_pinned(m, f, a)
    wait_all(m, 1, timeout=60)
    held = os.path.join(cache_dir(joined(m)[a]), f.cachename())
    os.chmod(held, 0o644)
    with open(held, "r+b") as fh:            # a bit flips on worker a's disk, late in the file
        fh.seek(12 << 20)
        c = fh.read(1)
        fh.seek(12 << 20)
        fh.write(bytes([c[0] ^ 1]))
    tasks = [run_pinned(m, f, wid) for wid in rest]
    got = wait_all(m, len(rest), timeout=90)
    want = md5(src)
    assert all(t.successful() and t.attempts == 1 and t.std_output.split()[0] == want for t in tasks), \
        [(t.id, t.result, t.reason, t.std_output) for t in got.values()]
    recs = read_journal(m)
    first = {}
    for r in recs:
        if r["event"] in ("transfer", "transfer failed") and r["file"] == f.cachename():
            first.setdefault(r["dest"], r)
    # the first copies came down the chain from a: each failed (corrupt, or its source's failed)
    assert all(first[w]["event"] == "transfer failed" for w in rest), first
    assert any(first[w]["source"] not in (a, "manager") for w in rest), first      # one was passed on
    for wid in rest:                         # what each worker keeps is the good copy
        assert md5(os.path.join(cache_dir(joined(m)[wid]), f.cachename())) == want
    assert not [r for r in recs if r["event"] in ("retry", "failed")]


@pytest.mark.timeout(90)
def test_temps_move_worker_to_worker_never_through_the_manager(make_manager):
    m = ready(make_manager, 2)
    a, b = sorted(joined(m))
    temp = m.declare_temp()
    prod = Task("head -c 1000000 /dev/urandom > out && md5sum out")
    prod.add_output(temp, "out")
    m.submit(prod, worker=a)
    (p,) = wait_all(m, 1, timeout=30).values()
    assert p.successful(), (p.result, p.reason)
    tasks = [run_pinned(m, temp, b), run_pinned(m, temp, b)]
    got = wait_all(m, 2, timeout=60)
    assert all(t.successful() and t.std_output.split()[0] == p.std_output.split()[0] for t in got.values()), \
        [(t.result, t.reason) for t in tasks]
    recs = read_journal(m)
    moved = [r for r in recs if r["event"] == "transfer" and r["file"] == temp.cachename()]
    assert [(r["source"], r["dest"], r["bytes"]) for r in moved] == [(a, b, 1000000)]   # once, from a
    assert not [r for r in recs if r["event"] in ("fetch temp", "put") and r.get("file") == temp.cachename()]
    assert m.stats["bytes_received"] == 0             # not a temp byte came through the manager
    assert m.fetch_file(temp) and m.stats["bytes_received"] > 0    # and brought back on request


def test_declared_without_peer_transfer_always_from_the_manager(tmp_path):
    sim = Sim()
    src = tmp_path / "x"
    src.write_bytes(b"x" * 100)
    f = vinehpc.Manager.declare_file(None, str(src), cache=True, peer_transfer=False)
    join_all(sim, 2)
    sim.core.replicas[f.cachename()] |= {1}
    sim.core.workers[1].cached.add(f.cachename())
    sim.submit(new_task().add_input(f, "in"), pin=2)
    sim.schedule()
    cmds = sim.take()
    assert [(c.wid, c.ack) for c in of(cmds, PutFile)] == [(2, False)] and not of(cmds, Fetch)


# ====================================================================== the worker's side, by events

def peer_task(tid, n):
    return TaskSpec(tid, "cat in", None, inputs=(Input(n, "in", "file", "workflow", None),),
                    res={"cores": 1, "memory": 0, "disk": 0, "gpus": 0}, expect=(n,), report_start=True)


def test_worker_waits_for_an_expected_input_and_starts_when_it_arrives():
    st = WorkerState({"cores": 2, "memory": 0, "disk": 0, "gpus": 0})
    n = "file-" + "ab" * 16
    out = st.handle(FetchRequested(n, "10.0.0.1", 4000, 5, "workflow", "sha256:" + "ab" * 16), 0.0)
    assert [type(c) for c in out] == [FetchPeer]
    assert st.handle(TaskReceived(peer_task(1, n)), 0.0) == []          # waits: no "input missing"
    assert st.handle(TaskReceived(peer_task(2, n)), 0.0) == []
    out = st.handle(PeerFetched(n, False, reason="stalled"), 1.0)
    assert [(type(c), c.ok) for c in out] == [(SendFetched, False)]    # the tasks keep waiting
    assert st.handle(FetchRequested(n, "10.0.0.2", 4000, 5, "workflow", None), 1.0)[0].host == "10.0.0.2"
    out = st.handle(PeerFetched(n, True, 5, 0.1), 2.0)
    assert out[0] == SendFetched(n, True, 5, 0.1, None, False)
    assert sorted(c.spec.id for c in out if isinstance(c, StartTask)) == [1, 2] and st.files[n] == "workflow"
    # held now: a fetch asked again is answered at once
    assert st.handle(FetchRequested(n, "10.0.0.2", 4000, 5, "workflow", None), 3.0) == [
        SendFetched(n, True, 5, 0.0, "already held")]


def test_worker_takes_the_managers_put_instead_and_a_full_disk_fails_its_waiters_as_its_fault():
    st = WorkerState({"cores": 2, "memory": 0, "disk": 0, "gpus": 0})
    n, m = "file-" + "cd" * 16, "file-" + "ef" * 16
    st.handle(TaskReceived(peer_task(1, n)), 0.0)
    out = st.handle(FileStored(n, "workflow"), 1.0)                   # the manager sent it itself
    assert [c.spec.id for c in out if isinstance(c, StartTask)] == [1]
    st.handle(FetchRequested(m, "10.0.0.1", 4000, 5, "workflow", None), 0.0)
    st.handle(TaskReceived(peer_task(2, m)), 0.0)
    out = st.handle(PeerFetched(m, False, reason="No space left on device", local=True), 1.0)
    assert out[0].local and not out[0].ok
    (r,) = [c for c in out if isinstance(c, SendResult)]
    assert (r.tid, r.status, r.worker_fault) == (2, "input missing", True)
    out = st.handle(FileFailed(m, "disk full"), 2.0)                 # (a later put fails too: nothing waits)
    assert not [c for c in out if isinstance(c, SendResult)]


def test_a_file_still_arriving_is_streamed_as_it_grows_and_given_up_if_its_writer_fails(tmp_path):
    import threading
    from vinehpc.comm import peer
    part = tmp_path / "part"
    data = os.urandom(3 * wire.CHUNK + 5)
    part.write_bytes(data[:1000])
    arrival = peer.Arrivals().begin("file-x", str(part), len(data))
    arrival.wrote(1000)
    a, b = socket.socketpair()
    got = []
    with arrival.open() as fh:
        th = threading.Thread(target=lambda: got.append(peer._stream(a, fh, "file-x", len(data), arrival)))
        th.start()
        dec = messages.decoder()
        out = b""
        while len(out) < 1000:                  # what was written is sent before the rest exists
            for name, ctl, frames in dec.feed(b.recv(1 << 20)):
                out += frames[0]
        assert out == data[:1000]
        with open(part, "ab") as w:
            w.write(data[1000:])
        arrival.wrote(len(data) - 1000)         # its writer says so: the rest follows at once
        while True:
            msgs = dec.feed(b.recv(1 << 20))
            for name, ctl, frames in msgs:
                out += frames[0]
            if msgs and msgs[-1][1]["last"]:
                break
        th.join(5)
    assert out == data
    part.write_bytes(b"x" * 10)                 # a writer that fails: its readers give up at once
    arrival = peer.Arrivals().begin("file-y", str(part), 100)
    arrival.wrote(10)
    errors = []

    def serve():
        try:
            peer._stream(a, fh, "file-y", 100, arrival)
        except OSError as e:
            errors.append(e)
    with arrival.open() as fh:
        th = threading.Thread(target=serve)
        th.start()
        dec, out = messages.decoder(), b""
        while len(out) < 10:                    # its 10 bytes sent: the server now waits for more
            for name, ctl, frames in dec.feed(b.recv(1 << 20)):
                out += frames[0]
        arrival.fail()
        th.join(5)
    assert "failed" in str(errors[0])
    a.close()
    b.close()


def test_decoder_hands_a_payload_to_its_reader_unread_with_the_limits_kept():
    # the fetcher reads a `file` message's header through the decoder and its payload itself
    data = os.urandom(5000)
    msg = wire.encode_bytes(messages.CODES["file"], {"cn": "file-x", "off": 0, "last": True, "size": 5000}, [data])
    err = messages.encode_bytes(messages.Error(cn="file-x", reason="no"))
    for cut in (1, 9, 30, len(msg) - 5000, len(msg) - 1):
        dec = messages.decoder(max_frame=wire.CHUNK)
        dec.push(msg[:cut])
        head = dec.next_head()
        if head is None:                            # the header is not all there yet
            dec.push(msg[cut:])
            head, rest = dec.next_head(), b""
        else:
            rest = msg[cut:]
        name, ctl, lengths = head
        assert (name, lengths) == ("file", (5000,)) and messages.decode(name, ctl, [None]).size == 5000
        got = dec.take(5000)
        assert got + rest == data
        dec.push(err)
        assert messages.decode(*dec.next_message()).reason == "no"    # the stream goes on after it
    dec = messages.decoder(max_frame=1000)
    dec.push(msg[:30])
    with pytest.raises(wire.ProtocolError, match="exceeds"):
        dec.next_head()


def test_fetch_refuses_a_source_that_sends_more_than_the_file(tmp_path):
    # a payload past the file's size is refused from its header, before a byte of it is written
    import threading
    from vinehpc.comm import peer
    srv = socket.create_server(("127.0.0.1", 0))

    def liar():
        s, _ = srv.accept()
        with s:
            peer._greet(s, "s3cret")
            s.recv(4096)                                            # the want
            s.sendall(wire.encode_bytes(messages.CODES["file"], {"cn": "file-" + "ab" * 32, "off": 0,
                                                                 "last": True, "size": 10}, [b"x" * 20]))
            read_to_eof(s)
    th = threading.Thread(target=liar)
    th.start()
    part = tmp_path / "part"
    arrivals = peer.Arrivals()
    with pytest.raises(peer.TransferError, match="expected"):
        peer.fetch("127.0.0.1", srv.getsockname()[1], "s3cret", "file-" + "ab" * 32, str(part), 10, None,
                   arrivals=arrivals)
    th.join(10)
    srv.close()
    assert not part.exists()
    assert arrivals.get("file-" + "ab" * 32).failed         # whoever was served from it stops (the loop settles it)
