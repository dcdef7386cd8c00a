"""Fuzzing the validation layer (issue 14): every message type, both directions, over real TCP
after a real handshake.

For each message type a valid message is generated from its schema (messages.py: each field's
Check.shape), then mutated -- a field set to a value of the wrong shape (a list for an id, a
string for a size, a nested object, a huge or negative int, NaN, unicode, an oversized string), a
key dropped or added, the wrong number of payload frames, or the bytes themselves spoiled (cut
short, garbage, a control part that is not JSON, a header that lies) -- and sent:

- worker -> manager: from a raw authenticated worker (test_e2e's helpers) to a real Manager whose
  two real workers hold tasks in flight (the fuzzed ids aim at them);
- manager -> worker: from a fake manager (the real handshake, handshake.Greeter) to a real
  `vinehpc worker` process, which reconnects after every example.

Every frame is judged locally twice: by the peer's own decoder (wire + messages.decode) and by a
plain interpreter of the schema (`conforms`, in fuzz_frames.py with the mutations); they must agree.  Then over the wire: a
frame the decoder refuses must get its sender disconnected, with that very reason logged (the
manager's journal, the worker's log); a valid one is answered (a probe after it is) or refused by
the handler; the peer process never dies nor hangs, and it serves honest tasks correctly after.

Bounded for CI (about 2,000 frames).  By hand, longer and with a fresh seed:
    python3 tests/test_fuzz.py --long 2000 [--seed N]   (N examples per message type and direction)
or VINEHPC_FUZZ_EXAMPLES=2000 with pytest; it prints the frames tried and the failures found.
"""
from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import sys
import time

import cloudpickle
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vinehpc
from vinehpc import PythonTask, Task
from vinehpc.protocol import auth, handshake, messages, wire

from conftest import close_and_check, poll, read_journal, wait_all
from fuzz_frames import expect, judge, mutate, outcome, send, valid
from test_e2e import _answered_hello, _authenticated_raw, _joined_raw_worker

cloudpickle.register_pickle_by_value(sys.modules[__name__])

LONG = int(os.environ.get("VINEHPC_FUZZ_EXAMPLES", "0"))      # examples per message type; 0: CI's budget
NAMES = sorted(messages.BY_NAME)
TO_MANAGER = ("info", "error", "result", "started", "outfile", "watch", "file", "cached", "ping", "pong", "batch")
TO_WORKER = ("exit", "fn", "forget", "put", "task", "kill", "get", "unlink", "ping", "pong", "batch")


def budget(ci_examples, slow=False):
    """Examples for one message type: CI's, or the long run's (a tenth of it where the peer
    waits a second after each refusal: a worker's failed handshake)."""
    if LONG:
        return max(ci_examples, LONG // 10 if slow else LONG)
    return ci_examples


def fuzz_settings(n):
    return settings(max_examples=n, deadline=None, derandomize=not LONG, database=None, print_blob=True,
                    suppress_health_check=list(HealthCheck))


def gate(path, x):
    """A task that runs until the test opens the gate (a file appears): in flight while fuzzing."""
    deadline = time.monotonic() + 600
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)
    return x * x


def square(x):
    return x * x


# ====================================================================== worker -> manager
@pytest.fixture(scope="module")
def fuzz_manager(tmp_path_factory):
    m = vinehpc.Manager(run_dir=str(tmp_path_factory.mktemp("fuzz") / "run"), local_workers=2, cores_per_worker=1)
    m.wait_for_workers(2, timeout=30)
    yield m
    close_and_check(m)


def _closes_logged(recs):
    """Reasons of the closes the manager logged: joined workers' (`worker lost`) one by one; the
    others' one by one up to a rate, then counted by the first word of the reason."""
    lost = [r["reason"] for r in recs if r.get("event") == "worker lost" and r.get("host") != "127.0.0.1"]
    one = [r["reason"] for r in recs if r.get("event") == "connection closed"]
    counted = collections.Counter()
    for r in recs:
        if r.get("event") == "connections closed":
            counted.update(r["reasons"])
    return lost, one, counted


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", NAMES)
def test_manager_survives_fuzzed_messages_and_logs_each_refusal(fuzz_manager, tmp_path, name):
    m = fuzz_manager
    before = len(read_journal(m))
    door = str(tmp_path / "open")
    gates = {m.submit(PythonTask(gate, door, i)): i * i for i in range(2)}      # on the two real workers
    poll(lambda: m.stats["tasks_running"] == 2, 30, "both gate tasks running", m=m)
    ids = st.sampled_from(sorted(gates)) | valid(messages.Id)
    over = {"id": ids, "ids": st.lists(ids, max_size=4)}
    cls = messages.BY_NAME[name]
    base = st.fixed_dictionaries({k: over.get(k, valid(c)) for k, c, req in cls.FIELDS if req},
                                 optional={k: over.get(k, valid(c)) for k, c, req in cls.FIELDS if not req})
    frames = st.lists(st.binary(max_size=64), min_size=int(cls.PAYLOAD_REQUIRED), max_size=int(cls.PAYLOAD is not None))
    refused = {"joined": [], "other": []}
    closed_joined = [0]

    @fuzz_settings(budget(100 if name in TO_MANAGER else 15))
    @given(st.data())
    def one(data):
        ctl, fr = data.draw(base), data.draw(frames)
        if name == "auth":            # the handshake's own message, in its place
            s, hs = _answered_hello(m)
            ctl = dict(judge(hs.auth())[1][0][1])
            where, probe, want = "other", None, "welcome"
        elif name == "status":        # what a `vinehpc status` client sends
            s = _authenticated_raw(m, handshake.STATUS)
            where, probe, want = "other", messages.encode_bytes(messages.Status()), "snapshot"
        elif name == "info":          # the first message of a worker
            s = _authenticated_raw(m)
            where, probe, want = "other", None, "pong"
        else:
            s = _joined_raw_worker(m)
            where, probe, want = "joined", messages.encode_bytes(messages.Ping()), "pong"
            s.sendall(probe)        # joined before the frame comes (one read could hold both)
            assert outcome(s, want) == "answered"
        if name == "info":
            probe = messages.encode_bytes(messages.Ping())
        raw, shut = mutate(data, name, ctl, fr)
        verdict, what = judge(raw, preauth=name == "auth")
        send(s, raw, shut)
        if verdict == "valid" and not shut and probe is not None:
            send(s, probe, False)
        try:
            got = outcome(s, want)
        finally:
            s.close()
        expect(verdict, shut, got, "%s to the manager" % name)
        if verdict == "refused":
            refused[where].append("protocol error: " + what)
        elif where == "joined" and got == "closed" and not shut:
            closed_joined[0] += 1
        assert m._server.error is None and m._server.thread.is_alive(), "the manager's I/O thread died"

    try:
        one()
    finally:    # the gates end and are collected whatever happened: the next test's run alone
        open(door, "w").close()
        ended = wait_all(m, len(gates), timeout=60)
    assert {tid: t.output for tid, t in ended.items()} == gates
    honest = {m.submit(PythonTask(square, i)): i * i for i in range(10)}
    got = wait_all(m, len(honest), timeout=60)
    assert {tid: t.output for tid, t in got.items()} == honest
    assert m.stats["workers"] == 2
    # every refusal logged with its reason (the joined: one by one; the others: rate-limited)
    def logged():
        lost, one_by_one, counted = _closes_logged(read_journal(m)[before:])
        pending = m._server.admission.unlogged["protocol error"]
        return lost, one_by_one, counted["protocol error"] + pending
    lost, one_by_one, counted = logged()
    errors = [r for r in lost if r.startswith("protocol error")]
    missing = collections.Counter(refused["joined"]) - collections.Counter(errors)
    assert not missing, "refused but not logged: %s" % list(missing)[:3]
    assert len(errors) == len(refused["joined"]) + closed_joined[0]
    shown = [r for r in one_by_one if r.startswith("protocol error")]
    assert not set(shown) - set(refused["other"]) and len(shown) + counted >= len(refused["other"])


# ====================================================================== manager -> worker
class FakeManager:
    """A listening socket speaking the manager's side of the handshake to a real worker."""

    def __init__(self, d):
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.port = self.lsock.getsockname()[1]
        self.secret = auth.new_secret()
        self.secret_file = str(d / "secret")
        auth.write_secret(self.secret_file, self.secret)

    def accept(self):
        self.lsock.settimeout(20)
        s, _ = self.lsock.accept()
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)     # as test_e2e's _connect
        return s

    def join(self, s, g=None):
        """Greet the worker on `s` (`g`: a greeter whose hello was sent) up to its auth (None if
        it closes the connection instead), then welcome it: a decoder holding what came after."""
        if g is None:
            g = handshake.Greeter(self.secret, handshake.WORKER)
            s.sendall(g.hello())
        got = b""
        s.settimeout(10)
        try:
            while g.receive_data(got) is None:
                got = s.recv(4096)
                if not got:
                    return None
        except ConnectionResetError:
            return None
        s.sendall(g.welcome(wid=1, keepalive=[5.0, 30.0]))
        dec = messages.decoder()
        dec.push(g.rest)
        return dec


class FuzzedWorker:
    """A real `vinehpc worker` process serving the fake manager; started again by the next test
    if one killed it (that test fails: the next ones still fuzz)."""

    def __init__(self, d):
        self.d, self.fm, self.proc, self.n = d, FakeManager(d), None, 0

    def ensure(self):
        if self.proc is not None and self.proc.poll() is None:
            return
        self.n += 1
        self.err = self.d / ("worker%d.err" % self.n)
        with open(self.err, "w") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "vinehpc", "worker", "127.0.0.1:%d" % self.fm.port,
                                          "--secret-file", self.fm.secret_file, "--cores", "1", "--connect-timeout",
                                          "60", "--verbose"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=f, start_new_session=True)

    def check(self):
        """The worker is alive, or it exited as told (spoiled bytes can make a valid exit): then it
        is started again."""
        if self.proc.poll() is None:
            return
        log = self.err.read_text()
        if self.proc.returncode == 0 and log.splitlines()[-2].endswith("the manager says exit: None"):
            return self.ensure()
        raise AssertionError("the worker died (exit %s): %s" % (self.proc.returncode, log[-3000:]))

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.fm.lsock.close()


@pytest.fixture(scope="module")
def fuzzed_worker(tmp_path_factory):
    w = FuzzedWorker(tmp_path_factory.mktemp("fuzzw"))
    w.ensure()
    yield w
    w.stop()


def to_worker(w, name, ctl, frames, spoil):
    """One example: the worker's next connection gets message `name` -- (ctl, frames) made into
    bytes by spoil(ctl, frames, keep, whole) -> (bytes, shut) -- in its place (a hello, a welcome)
    or after the handshake; then a ping.  Checks what the worker did; returns the local verdict
    and the refusal's reason."""
    w.check()
    fm = w.fm
    s = fm.accept()
    try:
        g = handshake.Greeter(fm.secret, handshake.WORKER)
        dec = messages.decoder()
        if name == "hello":
            raw, shut = spoil(dict(judge(g.hello())[1][0][1], **ctl), frames)
            verdict, what = judge(raw, preauth=True)
            send(s, raw, shut)
            if verdict == "valid" and not shut:
                # answered, the handshake must go on: a worker whose handshake ends after its auth
                # takes it for a wrong secret (and exits on the second)
                g.nonce = what[0][1]["nonce"]       # what its MAC covers: the nonce it was sent
                dec = fm.join(s, g)
        elif name == "welcome":
            # spoiled before the handshake (hypothesis may stop a test at any draw: a worker whose
            # handshake ends after its auth takes it for a wrong secret), with the MAC to come
            # kept (a wrong one ends the worker, as it should) and whole messages only
            ours = {"mac": "f" * 64, "wid": 1, "keepalive": [5.0, 30.0]}
            raw, shut = spoil(dict(ours, **ctl), frames, keep=("mac",), whole=False)
            s.sendall(g.hello())
            got = b""
            s.settimeout(10)
            while g.receive_data(got) is None:
                got = s.recv(4096)
            mac = judge(g.welcome())[1][0][1]["mac"]
            raw = raw.replace(b'"' + b"f" * 64 + b'"', b'"%s"' % mac.encode())       # the same length
            verdict, what = judge(raw, preauth=True)
            send(s, raw, shut)
        else:
            dec = fm.join(s)
            raw, shut = spoil(ctl, frames)
            verdict, what = judge(raw)
            send(s, raw, shut)
        if verdict == "valid" and not shut and dec is not None:
            send(s, messages.encode_bytes(messages.Ping()), False)
        got = "closed" if dec is None else outcome(s, "pong", dec)
    finally:
        s.close()
    expect(verdict, shut, got, "%s to the worker" % name)
    if verdict != "refused" and any(n == "exit" and c.get("final") is not False for n, c, _ in what):
        w.proc.wait(10)         # told to exit, it does (check() starts it again)
    w.check()
    return verdict, what


def serves(w, tag):
    """The worker (the same process) still runs a task the fake manager sends it, correctly."""
    w.check()
    s = w.fm.accept()
    try:
        dec = w.fm.join(s)
        s.sendall(messages.encode_bytes(messages.Task(cmd="echo served %s" % tag, id=7, inputs=[], outputs=[],
                                                      res={"cores": 1, "memory": 0, "disk": 0, "gpus": 0},
                                                      category="fuzz")))
        res = None
        s.settimeout(30)
        while res is None:
            for n, ctl, _ in dec.feed(s.recv(1 << 16)):
                if n == "result":
                    res = ctl
        assert res["status"] == "success" and res["stdout"] == "served %s\n" % tag, res
    finally:
        s.close()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", NAMES)
def test_worker_survives_fuzzed_messages_and_logs_each_refusal(fuzzed_worker, name):
    w = fuzzed_worker
    w.ensure()
    cls = messages.BY_NAME[name]
    # what a valid message of the manager's may make a worker do that we do not want here: run any
    # shell text (commands are chosen), fetch URLs or unpack images (input kinds), exit (final),
    # start a tunnel proxy; a welcome's MAC stays (a wrong one makes the worker exit, as it should)
    inputs = st.lists(st.tuples(valid(messages.Str(messages.NAME, 1)), valid(messages.Str(messages.NAME, 1)),
                                st.sampled_from(["file", "tar", "buffer", "temp"]), valid(messages.Str(messages.SHORT)),
                                st.none()).map(list), max_size=3)
    over = {"cmd": st.sampled_from(["true", "echo fuzz", "exit 3", "cat in.txt", "ls"]), "inputs": inputs,
            "final": st.just(False)}
    fields = [(k, c, req or k == "final") for k, c, req in cls.FIELDS if k not in ("tunnel", "mac")]
    base = st.fixed_dictionaries({k: over.get(k, valid(c)) for k, c, req in fields if req},
                                 optional={k: over.get(k, valid(c)) for k, c, req in fields if not req})
    if cls.EITHER:          # a valid task runs a command or a function
        base = base.map(lambda c: c if sum(c.get(k) is not None for k in cls.EITHER) == 1
                        else dict({k: v for k, v in c.items() if k not in cls.EITHER}, cmd="true"))
    frames = st.lists(st.binary(max_size=64), min_size=int(cls.PAYLOAD_REQUIRED), max_size=int(cls.PAYLOAD is not None))
    refused = []

    @fuzz_settings(budget(3, slow=True) if name in ("hello", "welcome") else budget(60 if name in TO_WORKER else 8))
    @given(st.data())
    def one(data):
        ctl, fr = data.draw(base), data.draw(frames)
        verdict, what = to_worker(w, name, ctl, fr,
                                  lambda c, f, keep=(), whole=True: mutate(data, name, c, f, keep + ("final",), whole))
        if verdict == "refused":
            refused.append(what)

    one()
    serves(w, "after %s" % name)
    log = "".join(f.read_text() for f in sorted(w.d.glob("worker*.err")))
    missing = [r for r in refused if r not in log]
    assert not missing, "refused but not logged by the worker: %s" % missing[:3]


def test_a_stranger_whose_mac_is_not_ascii_is_refused(fuzz_manager):
    """Found by fuzzing: compare_digest raised on it and the manager's I/O thread died."""
    m = fuzz_manager
    s, hs = _answered_hello(m)
    ctl = dict(judge(hs.auth())[1][0][1], mac="\u00e9" * 64)
    send(s, wire.encode_bytes(messages.CODES["auth"], ctl), False)
    assert outcome(s, "welcome") == "closed"
    s.close()
    assert m._server.error is None and m.wait_for_workers(2, timeout=10) == 2


# what the fuzzing found, kept as plain examples: each killed the worker before its fix
TASK = {"id": 1, "inputs": [], "outputs": [], "res": {"cores": 0, "memory": 0, "disk": 0, "gpus": 0}, "category": "x"}
FOUND = [
    ("task", TASK, "refused"),                              # neither cmd nor fid: a call of function None
    ("task", dict(TASK, cmd="true", fid="f"), "refused"),   # both
    ("welcome", {"keepalive": [1e18, 1e18]}, "valid"),      # a keepalive past the longest wait epoll takes
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name, ctl, verdict", FOUND)
def test_worker_survives_what_fuzzing_found(fuzzed_worker, name, ctl, verdict):
    w = fuzzed_worker
    w.ensure()
    as_is = lambda c, f, keep=(), whole=True: (wire.encode_bytes(messages.CODES[name], c, f), False)  # noqa: E731
    assert to_worker(w, name, ctl, [], as_is)[0] == verdict
    serves(w, "after a %s" % name)


@pytest.mark.timeout(120)
def test_fuzzed_worker_then_serves_a_real_manager(fuzzed_worker, tmp_path):
    """The worker fuzzed above (the same process) joins a real Manager on the fake one's port and
    returns correct results for Python and command tasks."""
    w = fuzzed_worker
    w.ensure()
    pid = w.proc.pid
    w.fm.lsock.close()
    m = vinehpc.Manager(port=w.fm.port, secret=w.fm.secret, run_dir=str(tmp_path / "run"), local_workers=0)
    try:
        m.wait_for_workers(1, timeout=60)
        expect_ = {m.submit(PythonTask(square, i)): i * i for i in range(20)}
        cmds = {m.submit(Task("echo %d" % i)): "%d\n" % i for i in range(10)}
        got = wait_all(m, len(expect_) + len(cmds), timeout=60)
        assert {tid: got[tid].output for tid in expect_} == expect_
        assert {tid: got[tid].std_output for tid in cmds} == cmds
        assert w.proc.poll() is None and w.proc.pid == pid
    finally:
        close_and_check(m)


# ====================================================================== by hand: the long run
def main(argv) -> int:
    import argparse
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--long", type=int, default=2000, metavar="N", help="examples per message type and direction")
    p.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: a fresh one, printed)")
    p.add_argument("-k", default=None, help="only the tests matching this pytest expression")
    a = p.parse_args(argv)
    seed = a.seed if a.seed is not None else int.from_bytes(os.urandom(4), "big")
    os.environ["VINEHPC_FUZZ_EXAMPLES"] = str(a.long)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    t0 = time.monotonic()
    args = [os.path.abspath(__file__), "-q", "-p", "no:cacheprovider", "--hypothesis-seed=%d" % seed,
            "-o", "timeout=0"] + (["-k", a.k] if a.k else [])
    failures = []

    class Count:
        def pytest_runtest_logreport(self, report):
            if report.failed:
                failures.append(report.nodeid)

    rc = pytest.main(args, plugins=[Count()])
    tally = sys.modules["fuzz_frames"].TALLY
    print("\nfuzz: %d frames tried in %.0f s (seed %d, %d examples per type): %d failure(s)%s"
          % (tally["frames"], time.monotonic() - t0, seed, a.long, len(failures),
             "".join("\n  " + f for f in failures)))
    for k, v in sorted(tally.items()):
        if k != "frames":
            print("  %-28s %d" % (k, v))
    return int(rc)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
