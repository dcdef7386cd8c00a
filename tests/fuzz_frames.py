"""Frames for tests/test_fuzz.py: valid messages read from the schema (messages.py's Check.shape),
their mutations, the local verdict (the peer's own decoder checked against a plain reading of
the schema), and what a peer did with a frame sent over a socket."""
from __future__ import annotations

import collections
import math
import socket
import time

from hypothesis import strategies as st

from vinehpc.protocol import messages, wire
from vinehpc.protocol.wire import HEADER, MAGIC, VERSION, ProtocolError

TALLY = collections.Counter()     # frames sent, by verdict and outcome (the long run prints it)
FIELD_NAMES = sorted({k for c in messages.BY_NAME.values() for k, _, _ in c.FIELDS})


# ====================================================================== the schema, read back
def valid(check, cap=3):
    """A strategy for values that `check` accepts (boundaries included)."""
    kind, *a = check.shape
    if kind == "int":
        return st.integers(a[0], a[1]) | st.sampled_from([a[0], a[1]])
    if kind == "num":
        return st.floats(a[0], a[1], allow_nan=False) | st.integers(math.ceil(a[0]), int(min(a[1], 2 ** 53)))
    if kind == "str":
        s = st.text(min_size=a[0], max_size=min(a[1], 20))
        return s | st.just("\u00e9" * a[1]) if a[1] <= messages.NAME else s      # the longest allowed
    if kind == "oneof":
        return st.sampled_from(a[0])
    if kind == "bool":
        return st.booleans()
    if kind == "null":
        return st.none() | valid(a[0])
    if kind == "list":
        return st.lists(valid(a[0]), max_size=min(a[1], cap))
    if kind == "row":
        return st.tuples(*[valid(c) for c in a[0]]).map(list)
    if kind == "dict":
        return st.dictionaries(valid(a[0]), valid(a[1]), max_size=min(a[2], cap))
    if kind == "record":
        return st.fixed_dictionaries({k: valid(c) for k, c in a[0].items()},
                                     optional={k: valid(c) for k, c in a[1].items()})
    if kind == "batch":         # [name, frames, control] items: messages of those names, without frames
        return st.lists(st.one_of(*[valid_ctl(n).map(lambda c, n=n: [n, 0, c]) for n in a[0]]),
                        min_size=1, max_size=min(a[1], cap))
    raise AssertionError("a check without a shape: %r" % (check.shape,))


def valid_ctl(name):
    """A strategy for control parts of message `name` that its schema accepts field by field."""
    fields = messages.BY_NAME[name].FIELDS
    return st.fixed_dictionaries({k: valid(c) for k, c, req in fields if req},
                                 optional={k: valid(c) for k, c, req in fields if not req})


def conforms(shape, v) -> bool:
    """The schema read plainly: the oracle the compiled decoders are compared with."""
    kind, *a = shape
    if kind == "int":
        return type(v) is int and a[0] <= v <= a[1]
    if kind == "num":
        return type(v) in (int, float) and a[0] <= v <= a[1]
    if kind == "str":
        return type(v) is str and a[0] <= len(v) <= a[1]
    if kind == "oneof":
        return type(v) is str and v in a[0]
    if kind == "bool":
        return type(v) is bool
    if kind == "null":
        return v is None or conforms(a[0].shape, v)
    if kind == "list":
        return type(v) is list and len(v) <= a[1] and all(conforms(a[0].shape, x) for x in v)
    if kind == "row":
        return type(v) is list and len(v) == len(a[0]) and all(conforms(c.shape, x) for c, x in zip(a[0], v))
    if kind == "dict":
        return (type(v) is dict and len(v) <= a[2]
                and all(conforms(a[0].shape, k) and conforms(a[1].shape, x) for k, x in v.items()))
    if kind == "record":
        req, opt = a
        return (type(v) is dict and set(v) <= set(req) | set(opt) and all(k in v for k in req)
                and all(conforms((req.get(k) or opt[k]).shape, x) for k, x in v.items()))
    if kind == "batch":         # the envelope (its items' contents: message_conforms)
        return (type(v) is list and 1 <= len(v) <= a[1]
                and all(type(x) is list and len(x) == 3 and type(x[0]) is str and x[0] in a[0] and type(x[1]) is int
                        and 0 <= x[1] <= wire.MAX_FRAMES and type(x[2]) is dict for x in v))
    raise AssertionError(shape)


def message_conforms(name, ctl, frames) -> bool:
    if name == "batch":         # an envelope that conforms, whose items (with their frames) each do
        if set(ctl) != {"m"} or not conforms(messages.Batch.FIELDS[0][1].shape, ctl["m"]):
            return False
        pos = 0
        for n, k, c in ctl["m"]:
            if not message_conforms(n, c, frames[pos:pos + k]):
                return False
            pos += k
        return pos == len(frames)
    cls = messages.BY_NAME[name]
    fields = {k: (c, req) for k, c, req in cls.FIELDS}
    if any(k not in fields for k in ctl):
        return False
    for k, (c, req) in fields.items():
        v = ctl.get(k)
        if v is None:       # null is absent
            if req:
                return False
        elif not conforms(c.shape, v):
            return False
    if cls.EITHER and sum(ctl.get(k) is not None for k in cls.EITHER) != 1:
        return False
    most = 0 if cls.PAYLOAD is None else 1
    least = 1 if cls.PAYLOAD_REQUIRED else 0
    return least <= len(frames) <= most


# ====================================================================== mutations
ODD = ["", "\ud800", "\udfff\ud800", "\x00", "nul\x00in", "../../escape-fuzz", "..", "a/b", ".hidden", "12", "1e3",
       "true", "null", "-1", "\u202etxt.exe", "\U0001f600" * 3, "x" * (messages.SHORT + 1), "x" * (messages.NAME + 1)]
HOSTILE = st.one_of(
    st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70),
    st.sampled_from([-1, 0, 2 ** 31, 2 ** 62 + 1, 2 ** 63, -2 ** 63 - 1, 2 ** 64, 10 ** 40]),
    st.floats(), st.text(max_size=12), st.sampled_from(ODD),
    st.recursive(st.integers(-3, 3) | st.text(max_size=3) | st.none(),
                 lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c, max_size=3),
                 max_leaves=8),
    st.just("x" * (wire.MAX_CTL + 1)),                         # past the control part's limit
)
BAD_JSON = [b"{", b'{"a":', b"[1, 2]", b'"text"', b"null", b"NaN", b"{}{}", b'{"a": 1} x', b"\xff\xfe{}", b"\xc0\x80",
            b'{"id": 1' + b"1" * 5000 + b"}", b"[" * 100000, b'{"a": ' * 50000, b'{"\\ud800": 1}', b"{'a': 1}",
            b'{"id": 1, "id": [1]}', b" " * 100 + b"{}"]


def _positions(v, path=()):
    """Every place inside a JSON value (a path of keys and indexes), containers' insides too."""
    out = [path]
    if type(v) is list:
        for i, x in enumerate(v):
            out += _positions(x, path + (i,))
    elif type(v) is dict:
        for k, x in v.items():
            out += _positions(x, path + (k,))
    return out


def _set(v, path, new):
    for k in path[:-1]:
        v = v[k]
    v[path[-1]] = new


def mutate(data, name, ctl, frames, keep=(), whole=True):
    """(bytes, shut): the message (ctl, frames) after 0-3 mutations of its fields or frames, or
    spoiled bytes; `shut`: our side closes after them (the peer may be waiting for the rest).
    `keep`: fields left alone; `whole`: the peer may see only complete messages."""
    code = messages.CODES[name]
    how = data.draw(st.sampled_from(["none"] + ["fields"] * 6 + ["frames"] + ["bytes"] * 2))
    if how == "fields":
        for _ in range(data.draw(st.integers(1, 3))):
            keys = [k for k in ctl if k not in keep]
            op = data.draw(st.sampled_from(["set", "set", "deep", "drop", "add"])) if keys else "add"
            if op == "add":
                k = data.draw(st.sampled_from(FIELD_NAMES) | st.text(max_size=8))
                if k not in keep:
                    ctl[k] = data.draw(HOSTILE)
            elif op == "drop":
                del ctl[data.draw(st.sampled_from(keys))]
            elif op == "set":
                ctl[data.draw(st.sampled_from(keys))] = data.draw(HOSTILE)
            else:
                k = data.draw(st.sampled_from(keys))
                _set(ctl, data.draw(st.sampled_from(_positions(ctl[k], (k,)))), data.draw(HOSTILE))
    elif how == "frames":
        frames = data.draw(st.lists(st.binary(max_size=32), max_size=4))
    if how != "bytes":
        return wire.encode_bytes(code, ctl, frames), False
    full = wire.encode_bytes(code, ctl, frames)
    spoil = data.draw(st.sampled_from(["json", "json", "truncate", "garbage", "header"] if whole else ["json"]))
    if spoil == "json":
        body = data.draw(st.sampled_from(BAD_JSON) | st.binary(max_size=40))
        lens = [len(f) for f in frames]
        head = HEADER.pack(MAGIC, VERSION, code, len(lens), len(body)) + wire.LENGTHS[len(lens)].pack(*lens)
        return head + body + b"".join(frames), False
    if spoil == "truncate":
        return full[:data.draw(st.integers(0, len(full) - 1))], True
    if spoil == "garbage":
        prefix = data.draw(st.sampled_from([b"", MAGIC, MAGIC + bytes([VERSION])]))
        return prefix + data.draw(st.binary(min_size=1, max_size=64)), True
    if data.draw(st.booleans()):       # a frame length past the limit
        big = data.draw(st.integers(wire.MAX_FRAME + 1, 2 ** 64 - 1))
        return HEADER.pack(MAGIC, VERSION, code, 1, 0) + wire.LENGTHS[1].pack(big), True
    head = list(HEADER.unpack_from(full))
    i = data.draw(st.integers(1, 4))      # one of version, code, frame count, control length: any value
    head[i] = data.draw(st.integers(0, [0, 255, 255, 65535, 2 ** 32 - 1][i]))
    return HEADER.pack(*head) + full[HEADER.size:], True


def judge(raw, preauth=False):
    """What the peer's decoder makes of `raw`: ("valid", [(name, ctl, frames)...]), ("refused",
    reason) or ("incomplete", messages before) -- checked against the plain schema (conforms)."""
    dec = messages.decoder(max_ctl=wire.PREAUTH_MAX_CTL, allow_frames=False) if preauth else messages.decoder()
    dec.push(raw)
    got = []
    while True:
        try:
            m = dec.next_message()
        except ProtocolError as e:
            return "refused", str(e)
        if m is None:
            return ("incomplete" if dec.buf else "valid"), got
        try:
            messages.decode(*m)
        except ProtocolError as e:
            assert not message_conforms(*m), "decode refused what the schema allows: %r: %s" % (m, e)
            return "refused", str(e)
        assert message_conforms(*m), "decode accepted what the schema refuses: %r" % (m,)
        got.append(m)
        if preauth:     # the handshake takes one message; what follows is the session's
            rest, dec = bytes(dec.buf), messages.decoder()
            dec.push(rest)
            preauth = False


# ====================================================================== sending, and what came back
def send(s, raw, shut):
    try:
        s.sendall(raw)
        if shut:
            s.shutdown(socket.SHUT_WR)
    except OSError:         # the peer closed already (refused what came first): said by outcome()
        pass


def outcome(s, want, dec=None, timeout=10.0) -> str:
    """"answered" once a `want` message arrives, "closed" when the peer ends the connection,
    "silent" if neither happens within `timeout` s (a hung peer)."""
    dec = dec or messages.decoder()
    deadline = time.monotonic() + timeout
    try:
        while True:
            while True:
                m = dec.next_message()
                if m is None:
                    break
                if m[0] == want:
                    return "answered"
            left = deadline - time.monotonic()
            if left <= 0:
                return "silent"
            s.settimeout(left)
            b = s.recv(1 << 16)
            if not b:
                return "closed"
            dec.push(b)
    except (ConnectionResetError, BrokenPipeError):
        return "closed"
    except socket.timeout:
        return "silent"


def expect(verdict, shut, got, what):
    """The peer's behaviour against the local verdict (test_fuzz.py's docstring says which)."""
    TALLY["frames"] += 1
    TALLY["%s, %s" % (verdict, got)] += 1
    if verdict == "incomplete" and got == "answered":
        pass        # complete messages before the cut were answered before our end was read
    elif verdict != "valid":
        assert got == "closed", "%s: the peer kept a connection after a frame it must refuse (%s)" % (what, got)
    elif shut:      # it may answer before it reads our end
        assert got in ("answered", "closed"), "%s: the peer hangs after our end (%s)" % (what, got)
    else:
        assert got in ("answered", "closed"), "%s: no answer and no close within 10 s: the peer hangs" % what
