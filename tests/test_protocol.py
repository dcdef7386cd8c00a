"""Wire format, typed messages, the handshake and Connection over a socketpair. No worker processes."""
import os
import select
import socket
import struct
import time

import pytest

from vinehpc.comm import Closed, Connection
from vinehpc.protocol import auth, messages, wire
from vinehpc.protocol.wire import HEADER, MAGIC, VERSION, ProtocolError

Decoder = messages.decoder          # the framing decoder, given the messages' code table
encode = messages.encode_named      # (name, ctl, frames) -> buffers, as the untyped senders do


def encode_bytes(name, ctl=None, frames=()):
    return b"".join(encode(name, ctl, frames))


def header(code=messages.CODES["task"], nframes=0, ctl_len=0, magic=MAGIC, version=VERSION):
    return HEADER.pack(magic, version, code, nframes, ctl_len)


def raw(code, ctl_bytes, frames=()):
    """A hand-built message (lets tests send control parts encode() would never make)."""
    head = header(code, len(frames), len(ctl_bytes))
    if frames:
        head += struct.pack("!%dQ" % len(frames), *[len(f) for f in frames])
    return head + ctl_bytes + b"".join(frames)


# ---------------------------------------------------------------- round trips
def test_round_trip_control_and_frames():
    ctl = {"id": 7, "cmd": "echo hi", "nested": {"a": [1, 2, None]}, "u": "h\u00e9"}
    frames = [b"\x00\x01pickle", b"", os.urandom(5000)]
    assert Decoder().feed(encode_bytes("task", ctl, frames)) == [("task", ctl, frames)]


def test_round_trip_zero_frames():
    assert Decoder().feed(encode_bytes("ping", {"t": 1.5})) == [("ping", {"t": 1.5}, [])]


def test_round_trip_empty_control():
    assert Decoder().feed(encode_bytes("pong")) == [("pong", {}, [])]
    assert Decoder().feed(encode_bytes("pong", {}, [b"x"])) == [("pong", {}, [b"x"])]


def test_zero_length_control_decodes_as_empty_object():
    assert Decoder().feed(raw(messages.CODES["exit"], b"")) == [("exit", {}, [])]


def test_encode_keeps_frames_as_separate_buffers():
    big = b"y" * 1000
    bufs = encode("put", {"cn": "file-1"}, [big])
    assert len(bufs) == 2 and bufs[1] is big


def test_incremental_feed_byte_by_byte():
    msg = encode_bytes("result", {"id": 3, "status": "success"}, [b"abc", b"defg"])
    d = Decoder()
    got = []
    for i in range(len(msg)):
        got += d.feed(msg[i:i + 1])
        if i < len(msg) - 1:
            assert got == []
    assert got == [("result", {"id": 3, "status": "success"}, [b"abc", b"defg"])]
    assert len(d.buf) == 0


def test_several_messages_in_one_feed():
    data = (encode_bytes("ping", {"n": 1}) + encode_bytes("put", {"n": 2}, [b"12345"])
            + encode_bytes("task", {"n": 3}))
    msgs = Decoder().feed(data + encode_bytes("pong")[:5])
    assert [(m[0], m[1]["n"]) for m in msgs] == [("ping", 1), ("put", 2), ("task", 3)]
    assert msgs[1][2] == [b"12345"]


def test_partial_message_completes_on_later_feed():
    msg = encode_bytes("file", {"k": "v"}, [b"z" * 100])
    d = Decoder()
    assert d.feed(msg[:50]) == []
    assert d.feed(msg[50:] + msg) == [("file", {"k": "v"}, [b"z" * 100])] * 2


def test_next_message_takes_one_at_a_time():
    # the handshake decodes with pre-auth limits one message at a time: what follows is left alone
    d = Decoder(max_ctl=wire.PREAUTH_MAX_CTL, allow_frames=False)
    behind = encode_bytes("fn", {"fid": "f"}, [b"pickle"])
    d.push(encode_bytes("welcome", {"wid": 1}) + behind)
    assert d.next_message() == ("welcome", {"wid": 1}, [])
    assert bytes(d.buf) == behind                   # not decoded (its frame would be refused)
    assert Decoder().feed(bytes(d.buf)) == [("fn", {"fid": "f"}, [b"pickle"])]


# ---------------------------------------------------------------- rejections
def test_bad_magic():
    with pytest.raises(ProtocolError, match="magic"):
        Decoder().feed(b"GET / HTTP/1.1\r\n")


def test_wrong_version():
    with pytest.raises(ProtocolError, match="version %d, expected %d" % (VERSION + 1, VERSION)):
        Decoder().feed(header(version=VERSION + 1))


def test_unknown_code():
    assert 99 not in messages.NAMES
    with pytest.raises(ProtocolError, match="unknown message code 99"):
        Decoder().feed(header(code=99))


def test_control_over_limit_rejected_from_header_alone():
    d = Decoder()
    with pytest.raises(ProtocolError, match="control part"):
        d.feed(header(ctl_len=0xFFFFFFFF))          # only 10 bytes: nothing else was buffered
    assert len(d.buf) == HEADER.size


def test_control_just_over_custom_limit():
    with pytest.raises(ProtocolError, match="exceeds the limit 100"):
        Decoder(max_ctl=100).feed(header(ctl_len=101))


def test_frame_over_limit_rejected_from_header_and_lengths():
    d = Decoder()
    data = header(nframes=2, ctl_len=2) + struct.pack("!2Q", 10, wire.MAX_FRAME + 1)
    with pytest.raises(ProtocolError, match="frame of %d bytes" % (wire.MAX_FRAME + 1)):
        d.feed(data)                                 # no control, no payload sent


def test_frame_limit_checked_once_lengths_complete():
    d = Decoder(max_frame=1000)
    data = header(nframes=1, ctl_len=2) + struct.pack("!Q", 1001)
    assert d.feed(data[:-1]) == []                   # length not complete yet: nothing to judge
    with pytest.raises(ProtocolError, match="exceeds the limit 1000"):
        d.feed(data[-1:])


def test_too_many_frames():
    with pytest.raises(ProtocolError, match="frames exceed"):
        Decoder().feed(header(nframes=wire.MAX_FRAMES + 1))


def test_frames_refused_before_authentication():
    d = Decoder(max_ctl=wire.PREAUTH_MAX_CTL, allow_frames=False)
    with pytest.raises(ProtocolError, match="before authentication"):
        d.feed(header(code=messages.CODES["auth"], nframes=1, ctl_len=2))


def test_preauth_control_limit():
    d = Decoder(max_ctl=wire.PREAUTH_MAX_CTL, allow_frames=False)
    with pytest.raises(ProtocolError, match="control part"):
        d.feed(header(code=messages.CODES["auth"], ctl_len=wire.PREAUTH_MAX_CTL + 1))


def test_non_json_control():
    with pytest.raises(ProtocolError, match="not JSON"):
        Decoder().feed(raw(messages.CODES["info"], b"{not json"))


def test_non_utf8_control():
    with pytest.raises(ProtocolError, match="not JSON"):
        Decoder().feed(raw(messages.CODES["info"], b'{"a":"\xff\xfe"}'))


@pytest.mark.parametrize("body", [b"[1,2]", b'"text"', b"3", b"null"])
def test_json_control_that_is_not_an_object(body):
    with pytest.raises(ProtocolError, match="JSON object"):
        Decoder().feed(raw(messages.CODES["info"], body))


def test_deeply_nested_control_is_a_protocol_error():
    d = Decoder(max_ctl=wire.PREAUTH_MAX_CTL, allow_frames=False)
    body = b"[" * 4000
    with pytest.raises(ProtocolError):
        d.feed(raw(messages.CODES["auth"], body))


# ---------------------------------------------------------------- handshake (auth.py)
def _exchange(secret_m, secret_w):
    """The three MACs of handshake.py's docstring, by hand; returns (manager ok, worker ok)."""
    nonce_m, nonce_w = auth.nonce(), auth.nonce()
    worker_mac = auth.mac(secret_w, "worker", nonce_m, nonce_w)
    m_ok = auth.check(secret_m, "worker", nonce_m, nonce_w, worker_mac)
    manager_mac = auth.mac(secret_m, "manager", nonce_w, nonce_m)
    w_ok = auth.check(secret_w, "manager", nonce_w, nonce_m, manager_mac)
    return m_ok, w_ok


def test_handshake_right_secret_passes():
    s = auth.new_secret()
    assert _exchange(s, s) == (True, True)


def test_handshake_wrong_secret_fails_both_ways():
    assert _exchange(auth.new_secret(), auth.new_secret()) == (False, False)


def test_mac_bound_to_role():
    s, a, b = auth.new_secret(), auth.nonce(), auth.nonce()
    # a manager cannot answer a worker's challenge with a worker MAC (reflection)
    assert not auth.check(s, "manager", a, b, auth.mac(s, "worker", a, b))
    assert not auth.check(s, "worker", a, b, auth.mac(s, "manager", a, b))


def test_mac_bound_to_nonce_order():
    s, a, b = auth.new_secret(), auth.nonce(), auth.nonce()
    assert not auth.check(s, "worker", a, b, auth.mac(s, "worker", b, a))


def test_replayed_mac_fails_with_fresh_nonce():
    s = auth.new_secret()
    nonce_m1, nonce_w = auth.nonce(), auth.nonce()
    recorded = auth.mac(s, "worker", nonce_m1, nonce_w)
    nonce_m2 = auth.nonce()                         # the manager's next connection
    assert nonce_m2 != nonce_m1
    assert not auth.check(s, "worker", nonce_m2, nonce_w, recorded)


@pytest.mark.parametrize("got", [None, 123, b"bytes", ""])
def test_check_rejects_non_string_or_empty_mac(got):
    assert not auth.check("s", "worker", "a", "b", got)


def test_nonces_and_secrets_are_fresh():
    assert len({auth.nonce() for _ in range(50)}) == 50
    assert len(auth.nonce()) == 2 * auth.NONCE_BYTES
    assert auth.new_secret() != auth.new_secret()


def test_read_secret_refuses_world_readable_file(tmp_path):
    p = tmp_path / "secret"
    p.write_text("s3cret\n")
    os.chmod(p, 0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        auth.read_secret(str(p))


def test_read_secret_accepts_0600(tmp_path):
    p = tmp_path / "secret"
    p.write_text("s3cret\n")
    os.chmod(p, 0o600)
    assert auth.read_secret(str(p)) == "s3cret"


def test_read_secret_refuses_empty(tmp_path):
    p = tmp_path / "secret"
    p.write_text("\n")
    os.chmod(p, 0o600)
    with pytest.raises(ValueError, match="empty"):
        auth.read_secret(str(p))


def test_write_secret_is_0600_and_reads_back(tmp_path):
    p = str(tmp_path / "secret")
    s = auth.new_secret()
    auth.write_secret(p, s)
    assert os.stat(p).st_mode & 0o777 == 0o600
    assert auth.read_secret(p) == s


# ---------------------------------------------------------------- Connection over a socketpair
def connection_pair(buffer):
    """Two Connections over a socketpair whose kernel buffers are `buffer` bytes (a fixture's body)."""
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
    ca, cb = Connection(a), Connection(b)
    yield ca, cb
    ca.close()
    cb.close()


@pytest.fixture
def pair():
    # bounded kernel buffers, whatever the host's defaults: the "stream is pulled lazily" and
    # "flush returns False" checks depend on the socket filling up
    yield from connection_pair(256 << 10)


def pump(sender, receiver, want, timeout=5.0, on_loop=None):
    """Flush the sender non-blockingly and read the receiver until `want` messages or timeout."""
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < want:
        if time.monotonic() > deadline:
            pytest.fail("timed out after %.1fs with %d of %d messages" % (timeout, len(got), want))
        sender.flush()
        select.select([receiver.sock], [sender.sock] if sender.wants_write() else [], [], 0.05)
        got += receiver.read()
        if on_loop:
            on_loop(got)
    return got


def test_connection_send_flush_read(pair):
    a, b = pair
    a.send("task", {"id": 1, "cmd": "true"}, [b"abc"])
    a.send("ping")
    got = pump(a, b, 2)
    assert got == [("task", {"id": 1, "cmd": "true"}, [b"abc"]), ("ping", {}, [])]
    assert not a.wants_write() and a.buffered == 0


def test_connection_both_directions(pair):
    a, b = pair
    a.send("ping", {"x": 1})
    assert pump(a, b, 1) == [("ping", {"x": 1}, [])]
    b.send("pong", {"x": 1})
    assert pump(b, a, 1) == [("pong", {"x": 1}, [])]


def test_stream_delivered_in_order_before_later_message(pair):
    a, b = pair
    chunk, n = wire.CHUNK, 5                       # 20 MB in 4 MB frames
    pulled = []

    def stream():
        for i in range(n):
            pulled.append(i)
            data = bytes([i]) * chunk
            yield encode("put", {"cn": "file-x", "i": i, "last": i == n - 1}, [data])

    a.send_stream(stream())
    a.send("task", {"id": 9})
    assert pulled == []                            # lazy: nothing pulled before flushing
    max_ahead = []
    got = pump(a, b, n + 1, timeout=10.0,
               on_loop=lambda g: max_ahead.append(len(pulled) - len(g)))
    assert [m[0] for m in got] == ["put"] * n + ["task"]
    assert [m[1].get("i") for m in got[:n]] == list(range(n))
    for i, m in enumerate(got[:n]):
        assert len(m[2][0]) == chunk and m[2][0][:1] == bytes([i]) and m[2][0][-1:] == bytes([i])
    assert got[-1][1] == {"id": 9}
    # the stream is pulled only as the socket drains: never many chunks ahead of the reader
    assert max(max_ahead) <= 3
    assert not a.wants_write()


def test_flush_returns_false_when_socket_full(pair):
    a, b = pair
    a.send("put", {}, [b"x" * (8 << 20)])          # far more than a socket buffer holds
    assert a.flush() is False
    assert a.wants_write()
    got = pump(a, b, 1)
    assert len(got[0][2][0]) == 8 << 20


def test_read_raises_closed_on_eof(pair):
    a, b = pair
    a.close()
    deadline = time.monotonic() + 2
    with pytest.raises(Closed):
        while time.monotonic() < deadline:
            b.read()
            time.sleep(0.01)


def test_connection_starts_with_the_handshakes_leftover():
    s1, s2 = socket.socketpair()
    a, b = Connection(s1), Connection(s2, encode_bytes("ping"))
    try:
        a.send_msg(messages.Fn(fid="f", data=b"pickle"))
        assert pump(a, b, 2) == [("ping", {}, []), ("fn", {"fid": "f"}, [b"pickle"])]
    finally:
        a.close()
        b.close()


# ---------------------------------------------------------------- typed messages (messages.py)
from vinehpc.protocol import messages  # noqa: E402

RES0 = {"cores": 1, "memory": 0, "disk": 0, "gpus": 0}
# every message as today's senders build it: (name, ctl, frames)
SAMPLES = [
    ("hello", {"v": 1, "nonce": "ab" * 32, "role": "manager"}, []),
    ("auth", {"v": 1, "nonce": "cd" * 32, "mac": "ef" * 32}, []),
    ("auth", {"v": 1, "nonce": "cd" * 32, "mac": "ef" * 32, "dest": {"host": "example.org", "port": 443}}, []),
    ("welcome", {"mac": "01" * 32, "wid": 3, "keepalive": [5.0, 30.0], "tunnel": {"port": 4000}}, []),
    ("welcome", {"mac": "01" * 32, "ok": False, "error": "refused", "detail": "connection refused", "errno": 111}, []),
    ("info", {"cores": 4, "memory": 8000, "disk": 100000, "gpus": 0, "host": "node1", "pid": 1234,
              "cached": ["file-abc", "url-def"], "workdir": "/tmp/w", "version": 1}, []),
    ("error", {"cn": "file-abc", "reason": "cannot send file-abc: gone"}, []),
    ("error", {"reason": "disk full"}, []),
    ("ping", {}, []),
    ("pong", {}, []),
    ("exit", {"reason": "the run is over", "final": True}, []),
    ("fn", {"fid": "fn-1"}, [b"pickled function"]),
    ("put", {"cn": "buffer-1", "off": 0, "last": True, "kind": "file", "size": 3, "level": "task"}, [b"abc"]),
    ("put", {"cn": "dir-1", "kind": "tar", "level": "workflow", "mode": 0o755, "off": 0, "last": False,
             "size": 1 << 30}, [b"x" * 100]),
    ("task", {"cmd": "echo hi > out", "id": 7, "inputs": [["file-1", "in.txt", "file", "workflow", None],
                                                          ["url-2", "data", "url", "task", "https://x/y"]],
              "outputs": [["out", "file", None], ["t", "temp", "temp-9"]], "env": {"A": "1"}, "res": RES0,
              "time_max": 60.0, "category": "default", "watch": ["out"]}, []),
    ("task", {"fid": "fn-1", "id": 8, "inputs": [], "outputs": [], "res": RES0, "category": "short",
              "pipe": True}, [b"pickled args"]),
    ("task", {"fid": "lib-1", "id": 9, "inputs": [], "outputs": [], "res": RES0, "category": "default",
              "slots": 4}, [b"pickled name and args"]),
    ("kill", {"id": 7}, []),
    ("forget", {"fid": "lib-1"}, []),
    ("status", {}, []),
    ("snapshot", {}, [b'{"counts": {}}']),
    ("get", {"cn": "temp-9"}, []),
    ("unlink", {"cn": "temp-9"}, []),
    ("result", {"id": 7, "status": "success", "wall": 0.25, "exit_code": 0, "stdout": "hi\n", "temps": ["temp-9"],
                "measured": {"memory": 1.5, "cores": 0.9, "wall": 0.25, "disk": 0.0, "read": 0, "written": 10,
                             "procs": 2}}, []),
    ("result", {"id": 8, "status": "resource exhaustion", "wall": 1.0, "reason": "memory: 20 MB used > 10 MB",
                "signal": "SIGKILL(-9)", "exhausted": {"resource": "memory", "used": 20, "allocated": 10},
                "worker_fault": True, "started": [8, 9]}, [b"pickled result"]),
    ("outfile", {"id": 7, "remote": "out", "tar": False, "off": 0, "last": True, "size": 3}, [b"abc"]),
    ("watch", {"id": 7, "remote": "log.txt", "off": 3}, [b"def"]),
    ("file", {"cn": "temp-9", "off": 0, "last": True, "size": 0}, [b""]),
    ("cached", {"cn": "url-2"}, []),
    ("started", {"ids": [3, 1, -2]}, []),
    # peer transfers (core/transfers.py, comm/peer.py)
    ("fetch", {"cn": "file-ab", "host": "10.0.0.7", "port": 40123, "size": 1 << 20, "level": "workflow",
               "digest": "sha256:" + "ab" * 16}, []),
    ("fetched", {"cn": "file-ab", "ok": True, "size": 1 << 20, "secs": 0.5}, []),
    ("fetched", {"cn": "temp-9", "ok": False, "reason": "stalled"}, []),
    ("want", {"cn": "temp-9"}, []),
    ("info", {"cores": 4, "memory": 8000, "disk": 100000, "gpus": 0, "host": "node1", "pid": 1234,
              "cached": [], "workdir": "/tmp/w", "version": 3, "port": 40123}, []),
    ("put", {"cn": "file-ab", "off": 0, "last": True, "kind": "file", "size": 3, "level": "workflow", "ack": True},
     [b"abc"]),
    ("task", {"cmd": "cat in", "id": 10, "inputs": [["file-ab", "in", "file", "workflow", None]], "outputs": [],
              "res": RES0, "category": "default", "expect": ["file-ab"]}, []),
    ("result", {"id": 10, "status": "success", "wall": 0.1, "temps": ["temp-9"],
                "sums": {"temp-9": [3, "sha256:" + "cd" * 16]}}, []),
    # several in one (comm.Connection batches what a loop turn sends; frames: see the batch tests below)
    ("batch", {"m": [["result", 0, {"id": 1, "status": "success", "wall": 0.0}],
                     ["task", 0, {"cmd": ":", "id": 2, "inputs": [], "outputs": [], "res": RES0, "category": "c"}]]},
     []),
]


def test_every_message_has_a_sample():
    assert {s[0] for s in SAMPLES} == set(messages.BY_NAME)


@pytest.mark.parametrize("name,ctl,frames", SAMPLES, ids=[s[0] for s in SAMPLES])
def test_message_round_trip(name, ctl, frames):
    m = messages.decode(name, ctl, frames)
    assert type(m) is messages.BY_NAME[name] and m.NAME == name
    assert m.to_ctl() == ctl
    # byte-compatible with today's untyped senders (same bytes when the keys come in wire order;
    # file_chunks puts off/last/size last: the same JSON object)
    assert messages.encode(m) == wire.encode(messages.CODES[name], m.to_ctl(), frames)
    assert Decoder().feed(messages.encode_bytes(m)) == Decoder().feed(encode_bytes(name, ctl, frames))
    assert messages.encode_named(name, ctl, frames) == wire.encode(messages.CODES[name], ctl, frames)
    # through the framing decoder and back
    (got,) = Decoder().feed(messages.encode_bytes(m))
    assert messages.decode(*got) == m
    # built by keywords, the same message
    kw = dict(ctl)
    if m.PAYLOAD and frames:
        kw[m.PAYLOAD] = frames[0]
    assert type(m)(**kw) == m


def test_decoded_fields_are_attributes():
    t = messages.decode("task", SAMPLES[15][1], [b"args"])
    assert (t.id, t.fid, t.cmd, t.args, t.pipe, t.time_max, t.env) == (8, "fn-1", None, b"args", True, None, None)
    assert t.slots is None and messages.decode("task", SAMPLES[16][1], [b"args"]).slots == 4
    r = messages.decode("result", {"id": 1, "status": "failed", "wall": 0}, [])
    assert r.value is None and r.reason is None and r.worker_fault is None


def test_null_counts_as_absent_for_optional_fields():
    r = messages.decode("result", {"id": 1, "status": "failed", "wall": 0, "reason": None}, [])
    assert r.reason is None and "reason" not in r.to_ctl()


LONG = "x" * (messages.SHORT + 1)
# name -> [(what is changed, ctl key, bad value)]: wrong type, out of range, too long, bad shape
BAD = {
    "hello": [("v", "1"), ("v", 256), ("nonce", ""), ("nonce", LONG), ("role", 5)],
    "auth": [("nonce", 12), ("mac", LONG), ("mac", None), ("dest", {"host": "h"}), ("dest", {"host": "h", "port": "1"}),
             ("dest", {"host": "h", "port": 1, "x": 1}), ("dest", ["h", 1])],
    "welcome": [("mac", b"x".decode() * 300), ("wid", "1"), ("wid", True), ("wid", -2 ** 63), ("keepalive", [5.0]),
                ("keepalive", [5.0, "30"]), ("keepalive", [0, 30]), ("tunnel", {"port": 0}), ("tunnel", {"other": 1}),
                ("ok", 1), ("errno", -1)],
    "info": [("cores", -1), ("cores", 1.5), ("memory", "8000"), ("gpus", True), ("host", LONG), ("pid", -1),
             ("cached", "file-abc"), ("cached", [1]), ("cached", [""]), ("workdir", None), ("version", 1000),
             ("port", 0), ("port", 70000)],
    "error": [("reason", 5), ("cn", ["x"])],
    "exit": [("final", "yes"), ("reason", 1)],
    "fn": [("fid", ""), ("fid", 1)],
    "put": [("off", -1), ("last", 0), ("kind", "dir"), ("size", 2 ** 63), ("level", LONG), ("mode", 0o10000), ("ack", 1),
            ("cn", "x" * (messages.NAME + 1))],
    "task": [("id", "7"), ("id", -2 ** 62 - 1), ("id", 1.0), ("inputs", [["file-1", "in", "file", "task"]]),
             ("inputs", [["file-1", "in", "file", "task", 3]]), ("inputs", {"a": 1}), ("outputs", [["out", "file"]]),
             ("outputs", [[1, "file", None]]), ("env", {"A": 1}), ("env", {"": "1"}), ("env", ["A=1"]),
             ("res", {"cores": 1}), ("res", dict(RES0, cores=-1)), ("res", dict(RES0, other=1)),
             ("res", dict(RES0, memory=1.5)), ("time_max", -1.0), ("time_max", float("nan")),
             ("time_max", float("inf")), ("category", 3), ("pipe", "true"), ("cmd", 3), ("slots", 0),
             ("slots", 1.5), ("slots", "4"), ("watch", "out"), ("watch", [""]), ("expect", "file-1"), ("expect", [""])],
    "kill": [("id", None), ("id", "x")],
    "get": [("cn", "")],
    "unlink": [("cn", 3)],
    "forget": [("fid", ""), ("fid", 3), ("fid", "x" * (messages.NAME + 1))],
    "result": [("status", ""), ("status", 0), ("wall", -1), ("wall", "1"), ("exit_code", 2 ** 40),
               ("stdout", b"x".hex().encode().decode() and 5), ("temps", "temp-9"), ("temps", [None]),
               ("measured", {"memory": "1"}), ("measured", [1]), ("exhausted", {"resource": "memory"}),
               ("exhausted", {"resource": "memory", "used": 1, "allocated": 1, "x": 1}), ("worker_fault", 1),
               ("started", [1, "2"]), ("started", 3), ("started", [0] * (messages.MAX_STARTED + 1)),
               ("sums", {"temp-9": [3]}), ("sums", {"temp-9": [-1, "sha256:ab"]}), ("sums", ["temp-9"])],
    "outfile": [("remote", ""), ("tar", None), ("off", "0"), ("size", -1)],
    "watch": [("remote", ""), ("off", "0"), ("id", None)],
    "file": [("last", "yes"), ("size", None)],
    "cached": [("size", -1), ("cn", None)],
    "fetch": [("port", 0), ("port", 65536), ("host", ""), ("size", -1), ("digest", ""), ("level", None)],
    "fetched": [("ok", 1), ("secs", -1), ("size", "1")],
    "want": [("cn", ""), ("cn", 5)],
    "started": [("ids", None), ("ids", 3), ("ids", [1.0]), ("ids", [True]), ("ids", [2 ** 63]),
                ("ids", list(range(messages.MAX_STARTED + 1)))],
    "batch": [("m", []), ("m", "x"), ("m", [["kill", 0, {"id": 1}]]), ("m", [["batch", 0, {"m": []}]]),
              ("m", [["result", -1, {}]]), ("m", [["result", 17, {}]]), ("m", [["result", True, {}]]),
              ("m", [["result", 0, []]]), ("m", [["result", 0, {}, 1]]), ("m", [[1, 0, {}]]),
              ("m", [["result", 0, {}]] * (messages.MAX_BATCH + 1))],
}


def _first_sample(name):
    return next((c, f) for n, c, f in SAMPLES if n == name and (name != "auth" or "dest" in c))


@pytest.mark.parametrize("name,key,bad", [(n, k, v) for n, cases in BAD.items() for k, v in cases],
                         ids=["%s.%s-%d" % (n, k, i) for n, cases in BAD.items() for i, (k, v) in enumerate(cases)])
def test_message_rejects_bad_field(name, key, bad):
    ctl, frames = _first_sample(name)
    ctl = dict(ctl, **{key: bad})
    with pytest.raises(ProtocolError) as e:
        messages.decode(name, ctl, frames)
    assert str(e.value).startswith("%s message: field %r" % (name, key)), str(e.value)


@pytest.mark.parametrize("name", sorted(messages.BY_NAME))
def test_message_rejects_unknown_field(name):
    ctl, frames = _first_sample(name)
    with pytest.raises(ProtocolError, match=r"^%s message: unknown field\(s\) 'surprise'" % name):
        messages.decode(name, dict(ctl, surprise=1), frames)


@pytest.mark.parametrize("name", sorted(messages.BY_NAME))
def test_message_rejects_missing_required_field(name):
    cls = messages.BY_NAME[name]
    required = [k for k, _, req in cls.FIELDS if req]
    ctl, frames = _first_sample(name)
    for k in required:
        with pytest.raises(ProtocolError, match=r"^%s message: field %r is missing" % (name, k)):
            messages.decode(name, {x: v for x, v in ctl.items() if x != k}, frames)


@pytest.mark.parametrize("name", sorted(messages.BY_NAME))
def test_message_rejects_wrong_number_of_frames(name):
    cls = messages.BY_NAME[name]
    ctl, _ = _first_sample(name)
    bad = [[b"a", b"b"]]
    if cls.PAYLOAD is None:
        bad.append([b"a"])
    elif cls.PAYLOAD_REQUIRED:
        bad.append([])
    for frames in bad:
        with pytest.raises(ProtocolError, match="^%s message: " % name):
            messages.decode(name, ctl, frames)


def test_unknown_message_name():
    with pytest.raises(ProtocolError, match="unknown message 'no-such-message'"):
        messages.decode("no-such-message", {}, [])


def test_error_names_message_field_and_value():
    with pytest.raises(ProtocolError) as e:
        messages.decode("kill", {"id": "x" * 1000}, [])
    msg = str(e.value)
    assert msg.startswith("kill message: field 'id' must be an int in") and "got str 'xxx" in msg and len(msg) < 300


def test_building_a_message_with_a_wrong_keyword_fails():
    with pytest.raises(TypeError, match="idd"):
        messages.Kill(id=3, idd=3)
    with pytest.raises(TypeError, match="id"):
        messages.Kill()
    with pytest.raises(TypeError, match="data"):
        messages.Fn(fid="f")


def test_recv_bytes_is_recv_without_a_fresh_buffer_per_read():
    # the reused per-thread buffer must never leak one read's bytes into another's result
    from vinehpc.comm.conn import SCRATCH, recv_bytes
    a, b = socket.socketpair()
    try:
        a.sendall(b"x" * 1000)
        assert recv_bytes(b, 1 << 18) == b"x" * 1000
        a.sendall(b"yz")
        first = recv_bytes(b, 1 << 18)
        assert first == b"yz" and isinstance(first, bytes)
        a.sendall(b"0123456789")
        assert recv_bytes(b, 4) == b"0123"                     # never more than asked
        assert recv_bytes(b, SCRATCH + 1) == b"456789"         # a large read: plain recv
        assert first == b"yz"                                  # results are copies, not views
        b.setblocking(False)
        with pytest.raises(BlockingIOError):
            recv_bytes(b, 1 << 18)
        a.close()
        assert recv_bytes(b, 1 << 18) == b""                  # EOF as recv reports it
    finally:
        a.close()
        b.close()


def test_start_reported_from_the_task_message():
    """Both ends decide from the task message alone whether the worker reports a task's start."""
    def rep(ctl):
        m = messages.decode("task", ctl, [b"args"] if "fid" in ctl else [])
        return messages.start_reported(m.pipe, m.slots, m.inputs)
    assert not rep({"cmd": "true", "id": 1, "inputs": [["file-1", "in", "file", "task", None]], "outputs": [],
                    "res": RES0, "category": "c"})
    assert rep({"fid": "fn-1", "id": 8, "inputs": [], "outputs": [], "res": RES0, "category": "c", "pipe": True})
    assert rep({"fid": "lib-1", "id": 9, "inputs": [], "outputs": [], "res": RES0, "category": "c", "slots": 2})
    for kind in ("url", "image"):
        assert rep({"cmd": "true", "id": 1, "inputs": [["x-1", "in", kind, "task", "u"]], "outputs": [],
                    "res": RES0, "category": "c"})


@pytest.mark.parametrize("ctl", [{"id": 1, "status": "success", "stdout": "caf\u00e9 \U0001f600\n\t\x00"},
                                 {"id": 2 ** 70}, {"m": {1: "a"}}, {"stdout": "caf\udce9"}, {"x": [1.5, -0.0, 1e300]},
                                 {"deep": [[[[[[[[[[1]]]]]]]]]]}])
def test_a_control_part_reads_back_the_same_with_or_without_orjson(ctl, monkeypatch):
    """orjson encodes and parses the control parts where it is installed; what it refuses (an int
    past 64 bits, a non-string key, a lone surrogate) goes through json, and a peer without it
    (an image, a foreign interpreter) reads and writes the same messages."""
    expected = __import__("json").loads(wire._json(ctl))
    fast = wire.encode_ctl(ctl)
    assert wire._loads(fast) == expected
    monkeypatch.setattr(wire, "orjson", None)
    slow = wire.encode_ctl(ctl)
    assert wire._loads(slow) == expected and wire._loads(fast) == expected
    assert slow.isascii()           # json's encoder escapes what is not ASCII


_STRANGE_PARTS = [
    b"[NaN]", b'{"a": NaN}', b'{"a":1} ', b"\xef\xbb\xbf{}", b'{"a":1}{"b":2}', b"{'a':1}", b'{"a":"\\ud800"}',
    b'{"a":' + b"9" * 30 + b"}", b'{"a":[18446744073709551616]}', b'{"a":"12345678901234567890"}',
    b'{"a":18446744073709551615,"b":-9223372036854775808,"c":1e400,"d":[1.5,-0.0]}', b'{"a":-9223372036854775809}',
    b"[" * 3000 + b"]" * 3000, b'{"a":' + b"[" * 300 + b"]" * 300 + b"}",
    b'{"a":' + b"[" * 1100 + b"]" * 1100 + b"}", b'{"a":' + b"[" * 250 + b"]" * 250 + b"}",
]


@pytest.mark.parametrize("body", _STRANGE_PARTS)
def test_control_parts_are_accepted_and_refused_as_json_would_with_orjson_or_without(body, monkeypatch):
    """The same value, of the same types (an int past 64 bits stays an int), or refused either way
    (a top-level list nested past json's recursion limit: json cannot read it, orjson reads a list,
    which is not an object)."""
    def outcome():
        try:
            ctl = wire.Decoder._ctl(memoryview(body), 0, len(body))
            return "ok", ctl, repr(ctl)
        except ProtocolError:
            return "refused"
    with_orjson = outcome()
    monkeypatch.setattr(wire, "orjson", None)
    assert outcome() == with_orjson
