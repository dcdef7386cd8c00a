"""Typed messages: one class per message that crosses the manager <-> worker wire, validated on decode.

A message's fields are its control part's JSON keys (the wire format is unchanged); the payload
frame, for the messages that carry one, is one more attribute (`data`, `args`, `value`).

    decode(name, ctl, frames) -> Message     raises ProtocolError naming the message and the field
    encode(msg) -> [buffers]                 what wire.encode gives for the same control part

Unknown keys are rejected, not ignored: both ends speak exactly one protocol version (the
header's version byte is checked before anything else), so a key we do not know is a bug or a
hostile peer, never a newer sender; adding a field means bumping wire.VERSION.  A null value
counts as absent (optional fields) or wrong (required ones).

Decoding is on the hot path (>10k messages/s): each class's decoder is compiled at import from
its fields' checks into straight-line `type(v) is ...` tests (a JSON int is exactly int, so
bool, a subclass of int, is refused for free) and fills the object without calling __init__.

At a dispatch point:  msg = decode(name, ctl, frames); then read msg.id, msg.status, msg.value...
To send:              conn.send_msg(Result(id=7, status="success", wall=0.1, value=pickled))
"""
from __future__ import annotations

from . import wire
from .wire import MAX_CTL, ProtocolError

SHORT = 256                 # nonces, MACs, statuses, kinds, cache levels, host names
NAME = 4096                 # cache names, function ids, remote (sandbox) names, categories, paths
TEXT = MAX_CTL              # commands, reasons, captured output, URLs, environment values
ITEMS = 1 << 20             # list and dict lengths (the control part's own limit binds first)
ID_MIN, ID_MAX = -2 ** 62, 2 ** 63 - 1
BIG = 2 ** 62               # sizes, offsets, resource amounts
RES = ("cores", "memory", "disk", "gpus")
MAX_STARTED = 10000         # task ids in one `started` list (a worker sends more as several)
BATCHED = ("task", "result")    # the messages a `batch` may carry (the ones sent a task at a time)
MAX_BATCH = 4096            # messages in one batch


def attempt(att) -> int:
    """The attempt number an `att` field says: absent (None) is the first.  A task message carries
    it from the second attempt on, and what the worker sends of that attempt echoes it."""
    return att or 1


def start_reported(pipe, slots, inputs, expect=None) -> bool:
    """Does the worker report when this task starts?  Both ends ask it of the task message's
    fields.  No: the manager sent it to a worker with room (no `pipe`), so it starts the moment it
    arrives and the manager logs its start at dispatch.  Yes: sent ahead (`pipe`: it may wait in
    the worker's queue or an interpreter's lane), or waiting on the worker for a URL fetch, an
    image unpack (input kinds "url", "image"), a transfer from another worker (`expect`) or a free
    slot of its library (`slots`)."""
    if pipe or slots or expect:
        return True
    for i in inputs:
        if i[2] == "url" or i[2] == "image":
            return True
    return False


# ---------------------------------------------------------------- checks
# A check writes source code: code(v, depth, fail) -> lines that run the statement `fail` (which
# raises) when the value named v is invalid; .what says what it wants, for errors.  Each message's
# decoder is compiled from its fields' checks once, at import, so checks run inline as plain
# `type(v) is ...` tests and for-loops (decoding is on the hot path).  `depth` names loop variables.
# .shape is what the check accepts as data, e.g. ("int", lo, hi) or ("list", check, maxlen): the
# schema for readers other than the compiler (tests/test_fuzz.py builds valid values and near
# misses of every field from it).
class Check:
    __slots__ = ("what", "cond", "code", "shape")

    def __init__(self, what, cond=None, code=None, shape=()):
        """cond(v) -> an expression true when v is valid; or code(v, depth, fail) -> lines."""
        self.what, self.cond, self.shape = what, cond, shape
        self.code = code or (lambda v, d, fail: ["if not %s: %s" % (cond(v), fail)])


def _indent(lines):
    return ["    " + x for x in lines]


def Int(lo=0, hi=BIG):
    return Check("an int in [%s, %s]" % (lo, hi), lambda v: "(type(%s) is int and %d <= %s <= %d)" % (v, lo, v, hi),
                 shape=("int", lo, hi))


def Num(lo=0.0, hi=1e18):
    # NaN and infinities (json.loads accepts them) fail the range comparison
    return Check("a number in [%s, %s]" % (lo, hi), lambda v: "((type(%s) is float or type(%s) is int) and %r <= %s <= %r)"
                 % (v, v, float(lo), v, float(hi)), shape=("num", float(lo), float(hi)))


def Str(maxlen, minlen=0):
    low = "%d <= " % minlen if minlen else ""
    return Check("a string of %d to %d characters" % (minlen, maxlen),
                 lambda v: "(type(%s) is str and %slen(%s) <= %d)" % (v, low, v, maxlen), shape=("str", minlen, maxlen))


def OneOf(*values):
    return Check("one of %s" % ", ".join(map(repr, values)), lambda v: "(type(%s) is str and %s in %r)" % (v, v, values),
                 shape=("oneof", values))


def Nullable(check):
    if check.cond is not None:
        return Check("null or " + check.what, lambda v: "(%s is None or %s)" % (v, check.cond(v)), shape=("null", check))
    return Check("null or " + check.what,
                 code=lambda v, d, fail: ["if %s is not None:" % v] + _indent(check.code(v, d, fail)),
                 shape=("null", check))


def ListOf(check, maxlen=ITEMS):
    def code(v, d, fail):
        x = "x%d" % d
        return (["if type(%s) is not list or len(%s) > %d: %s" % (v, v, maxlen, fail), "for %s in %s:" % (x, v)]
                + _indent(check.code(x, d + 1, fail)))
    return Check("a list of at most %d items, each %s" % (maxlen, check.what), code=code, shape=("list", check, maxlen))


def Row(*checks):
    """A JSON list of fixed shape: [check0, check1, ...]."""
    def code(v, d, fail):
        items = ["r%d_%d" % (d, i) for i in range(len(checks))]
        lines = ["if type(%s) is not list or len(%s) != %d: %s" % (v, v, len(checks), fail),
                 "%s, = %s" % (", ".join(items), v)]
        for x, c in zip(items, checks):
            lines += c.code(x, d + 1, fail)
        return lines
    return Check("[%s]" % ", ".join(c.what for c in checks), code=code, shape=("row", checks))


def DictOf(key, value, maxlen=ITEMS):
    def code(v, d, fail):
        k, x = "k%d" % d, "x%d" % d
        return (["if type(%s) is not dict or len(%s) > %d: %s" % (v, v, maxlen, fail),
                 "for %s, %s in %s.items():" % (k, x, v)]
                + _indent(key.code(k, d + 1, fail) + value.code(x, d + 1, fail)))
    return Check("an object of at most %d entries, %s: %s" % (maxlen, key.what, value.what), code=code,
                 shape=("dict", key, value, maxlen))


def Record(required=None, optional=None):
    """A JSON object with these keys (each with its check) and no others."""
    req, opt_ = dict(required or {}), dict(optional or {})
    what = "an object {%s}" % ", ".join(["%s: %s" % (k, c.what) for k, c in req.items()]
                                       + ["%s?: %s" % (k, c.what) for k, c in opt_.items()])

    def code(v, d, fail):
        # as many keys as the required ones plus the optional ones present: no other key
        count = " + ".join(["%d" % len(req)] + ["(%r in %s)" % (k, v) for k in opt_])
        lines = ["if type(%s) is not dict or len(%s) != %s: %s" % (v, v, count, fail)]
        for k, c in req.items():
            lines += ["if %r not in %s: %s" % (k, v, fail)] + c.code("%s[%r]" % (v, k), d, fail)
        for k, c in opt_.items():
            lines += ["if %r in %s:" % (k, v)] + _indent(c.code("%s[%r]" % (v, k), d, fail))
        return lines
    return Check(what, code=code, shape=("record", req, opt_))


Bool = Check("true or false", lambda v: "(type(%s) is bool)" % v, shape=("bool",))
Id = Int(ID_MIN, ID_MAX)


# ---------------------------------------------------------------- message classes
class Field:
    """A field of a message class (a class attribute, replaced by a slot by `message`)."""
    __slots__ = ("check", "required")

    def __init__(self, check, required=True):
        self.check, self.required = check, required


def opt(check):
    return Field(check, required=False)


class Message:
    """Base of every message class (see `message`): __init__ takes the fields by keyword."""
    __slots__ = ()
    NAME = ""
    CODE = 0
    FIELDS = ()           # ((key, check, required), ...) in wire order
    PAYLOAD = None        # attribute holding the payload frame, or None
    PAYLOAD_REQUIRED = False
    EITHER = ()           # fields of which exactly one is present (not null)

    def to_ctl(self) -> dict:
        """The control part: every field that is not None, in wire order."""
        out = {}
        for k, _, _ in self.FIELDS:
            v = getattr(self, k)
            if v is not None:
                out[k] = v
        return out

    def frames(self) -> list:
        if self.PAYLOAD is None:
            return []
        v = getattr(self, self.PAYLOAD)
        return [] if v is None else [v]

    def __eq__(self, other):
        return (type(other) is type(self) and self.to_ctl() == other.to_ctl()
                and self.frames() == other.frames())

    def __repr__(self):
        parts = ["%s=%r" % kv for kv in self.to_ctl().items()]
        parts += ["%s=<%d bytes>" % (self.PAYLOAD, len(f)) for f in self.frames()]
        return "%s(%s)" % (type(self).__name__, ", ".join(parts))


BY_NAME = {}                 # name -> class
CODES = {}                   # name -> wire code
NAMES = {}                   # wire code -> name (what wire.Decoder is given)
_DECODERS = {}               # name -> compiled decoder(ctl, frames)


def message(code, name, payload=None, payload_required=False, either=()):
    """Class decorator: the class's Field attributes (in definition order) become its slots and
    FIELDS; its __init__ and decoder are compiled; it is registered under `name` and `code`.
    `either`: optional fields of which exactly one must be present."""
    def make(cls):
        fields = [(k, v.check, v.required) for k, v in vars(cls).items() if isinstance(v, Field)]
        body = {k: v for k, v in vars(cls).items() if not isinstance(v, Field) and k not in ("__dict__", "__weakref__")}
        slots = tuple(k for k, _, _ in fields) + ((payload,) if payload else ())
        body.update(__slots__=slots, NAME=name, CODE=code, FIELDS=tuple(fields), PAYLOAD=payload,
                    PAYLOAD_REQUIRED=payload_required, EITHER=tuple(either))
        new = type(cls.__name__, cls.__bases__, body)
        if name in BY_NAME or code in NAMES:
            raise ValueError("message %s/%d defined twice" % (name, code))
        new.__init__, _DECODERS[name] = _compile(new)
        BY_NAME[name], CODES[name], NAMES[code] = new, code, name
        return new
    return make


def _compile(cls):
    """Source for cls's __init__ (keyword-only fields) and decoder, compiled."""
    name, fields, p = cls.NAME, cls.FIELDS, cls.PAYLOAD
    params = ["%s=None" % k for k, _, req in fields if not req] + [k for k, _, req in fields if req]
    if p:
        params.insert(0, p if cls.PAYLOAD_REQUIRED else "%s=None" % p)
    init = ["def __init__(self, *, %s):" % ", ".join(params) if params else "def __init__(self):"]
    init += ["    self.%s = %s" % (k, k) for k in [f[0] for f in fields] + ([p] if p else [])] or ["    pass"]
    dec = ["def decode(ctl, frames):", "    m = _new(_cls)", "    seen = 0", "    get = ctl.get"]
    for k, check, req in fields:
        dec.append("    v = get(%r)" % k)
        lines = check.code("v", 0, "_bad(%r, %r, v)" % (name, k)) + ["seen += 1"]
        if req:
            dec += ["    if v is None: _missing(%r, %r)" % (name, k)] + _indent(lines)
        else:
            dec += ["    if v is not None:"] + _indent(_indent(lines))
        dec.append("    m.%s = v" % k)
    dec.append("    if seen != len(ctl) and not ctl.keys() <= _keys: _unknown(%r, ctl)" % name)
    if cls.EITHER:
        dec.append("    if %s != 1: _either(%r)" % (" + ".join("(m.%s is not None)" % k for k in cls.EITHER), name))
    if p is None:
        dec.append("    if frames: _frames(%r, frames)" % name)
    elif cls.PAYLOAD_REQUIRED:
        dec += ["    if len(frames) != 1: _frames(%r, frames)" % name, "    m.%s = frames[0]" % p]
    else:
        dec += ["    if len(frames) > 1: _frames(%r, frames)" % name, "    m.%s = frames[0] if frames else None" % p]
    dec.append("    return m")
    ns = {"_new": object.__new__, "_cls": cls, "_missing": _missing, "_bad": _bad, "_unknown": _unknown,
          "_frames": _frames, "_either": _either, "_keys": frozenset(f[0] for f in fields)}
    exec(compile("\n".join(init + dec), "<message %s>" % name, "exec"), ns)
    return ns["__init__"], ns["decode"]


def _missing(name, key):
    raise ProtocolError("%s message: field %r is missing" % (name, key))


def _bad(name, key, v):
    check = next(c for k, c, _ in BY_NAME[name].FIELDS if k == key)
    try:
        s = repr(v)
    except RecursionError:      # nested as deep as the parser allows: the error is still a refusal
        s = "(nested too deep to show)"
    raise ProtocolError("%s message: field %r must be %s, got %s %s"
                        % (name, key, check.what, type(v).__name__, s if len(s) <= 80 else s[:77] + "..."))


def _unknown(name, ctl):
    known = {k for k, _, _ in BY_NAME[name].FIELDS}
    raise ProtocolError("%s message: unknown field(s) %s" % (name, ", ".join(repr(k)[:80] for k in ctl if k not in known)))


def _either(name):
    raise ProtocolError("%s message: needs exactly one of the fields %s"
                        % (name, ", ".join(map(repr, BY_NAME[name].EITHER))))


def _frames(name, frames):
    cls = BY_NAME[name]
    want = "no payload" if cls.PAYLOAD is None else "%s one frame (%s)" % (
        "exactly" if cls.PAYLOAD_REQUIRED else "at most", cls.PAYLOAD)
    raise ProtocolError("%s message: carries %s, got %d frame(s)" % (name, want, len(frames)))


# ---- the handshake (handshake.py drives it; limits before authentication are the Decoder's)
@message(1, "hello")
class Hello(Message):
    """greeter -> answerer (manager -> worker, egress -> tunnel proxy): a fresh nonce."""
    v = Field(Int(0, 255))
    nonce = Field(Str(SHORT, 1))
    role = Field(Str(SHORT))            # "manager" or "egress": who is speaking


@message(2, "auth")
class Auth(Message):
    """answerer -> greeter: its nonce and its MAC over both nonces (and dest, for the tunnel)."""
    v = Field(Int(0, 255))
    nonce = Field(Str(SHORT, 1))
    mac = Field(Str(SHORT))
    # a tunnel stream's destination; checked for validity after authentication (the egress
    # answers a bad one with a failed welcome)
    dest = opt(Record({"host": Str(1024), "port": Int(ID_MIN, ID_MAX)}))


@message(3, "welcome")
class Welcome(Message):
    """greeter -> answerer: the greeter's MAC; then what the session needs."""
    mac = Field(Str(SHORT))
    wid = opt(Id)                                   # manager: the worker's id
    keepalive = opt(Row(Num(0.001), Num(0.001)))    # manager: [interval, timeout] seconds
    tunnel = opt(Record(optional={"port": Int(1, 65535), "egress": Str(NAME, 1)}))
    ok = opt(Bool)                                  # egress: was the stream opened?
    error = opt(Str(SHORT))
    detail = opt(Str(TEXT))
    errno = opt(Int(0, 1 << 16))


# ---- worker -> manager
@message(4, "info")
class Info(Message):
    """The worker's resources and cache, right after the handshake."""
    cores = Field(Int())
    memory = Field(Int())
    disk = Field(Int())
    gpus = Field(Int())
    host = Field(Str(SHORT))
    pid = Field(Int(0, 1 << 32))
    cached = Field(ListOf(Str(NAME, 1)))
    workdir = Field(Str(NAME))
    version = Field(Int(0, 255))
    log = opt(Str(NAME))         # the worker's log file (on its node; `vinehpc logs` reads it)
    port = opt(Int(1, 65535))    # where it serves its cache to the run's other workers (fetch)


@message(5, "error")
class Error(Message):
    """A file the manager asked for (get) cannot be sent; or any worker-side trouble to log."""
    cn = opt(Str(NAME))
    reason = Field(Str(TEXT))


@message(30, "result", payload="value")
class Result(Message):
    """A task ended (or failed to start); value: a Python task's pickled (ok, value, traceback)."""
    id = Field(Id)
    status = Field(Str(SHORT, 1))
    wall = Field(Num())
    reason = opt(Str(TEXT))
    exit_code = opt(Int(-2 ** 31, 2 ** 31))
    signal = opt(Str(SHORT))
    stdout = opt(Str(TEXT))
    temps = opt(ListOf(Str(NAME, 1)))               # temp outputs now in the worker's cache
    # of those that are plain files: [size, "sha256:HEX"] (what a copy made by a peer transfer is checked against)
    sums = opt(DictOf(Str(NAME, 1), Row(Int(), Str(SHORT, 1))))
    measured = opt(DictOf(Str(SHORT), Nullable(Num(-1e18))))
    exhausted = opt(Record({"resource": Str(SHORT), "used": Num(-1e18), "allocated": Num(-1e18)}))
    worker_fault = opt(Bool)                        # rerun elsewhere without spending a retry
    # tasks whose start (start_reported) the worker has not reported yet, this one's included if
    # it is among them: they ride on the result instead of a `started` message of their own
    started = opt(ListOf(Id, MAX_STARTED))
    started_att = opt(DictOf(Str(SHORT, 1), Int(2, 1 << 31), MAX_STARTED))   # of those sent again: {id: att}
    att = opt(Int(2, 1 << 31))                      # the task message's attempt number (none: the first)


@message(35, "started")
class Started(Message):
    """Tasks that started since the worker's last report (start_reported), at most one message
    per worker loop turn; the manager stamps its own time on arrival."""
    ids = Field(ListOf(Id, MAX_STARTED))
    # of those sent again (a task message with att): {str(id): att}, so a late start of an attempt
    # killed there is not taken for the next attempt's (absent: all are first attempts)
    att = opt(DictOf(Str(SHORT, 1), Int(2, 1 << 31), MAX_STARTED))


@message(31, "outfile", payload="data", payload_required=True)
class Outfile(Message):
    """One chunk of a task's output file (a directory travels as a tar)."""
    id = Field(Id)
    remote = Field(Str(NAME, 1))
    tar = Field(Bool)
    off = Field(Int())
    last = Field(Bool)
    size = Field(Int())
    att = opt(Int(2, 1 << 31))                      # the task message's attempt number (none: the first)


@message(34, "watch", payload="data", payload_required=True)
class Watch(Message):
    """New bytes of a watched output while its task runs, written at `off` of the manager's file
    (off 0 starts the file again: a new attempt); the final file still comes as outfile."""
    id = Field(Id)
    remote = Field(Str(NAME, 1))
    off = Field(Int())
    att = opt(Int(2, 1 << 31))                      # the task message's attempt number (none: the first)


@message(32, "file", payload="data", payload_required=True)
class File(Message):
    """One chunk of a cached file the manager fetched (get)."""
    cn = Field(Str(NAME, 1))
    off = Field(Int())
    last = Field(Bool)
    size = Field(Int())


@message(33, "cached")
class Cached(Message):
    """The worker now holds this file (a URL it fetched; a put the manager asked it to acknowledge)."""
    cn = Field(Str(NAME, 1))
    size = opt(Int())


@message(36, "fetched")
class Fetched(Message):
    """A `fetch` ended: the file is in the cache (ok), or not (reason); the worker's own measure."""
    cn = Field(Str(NAME, 1))
    ok = Field(Bool)
    size = opt(Int())
    secs = opt(Num())
    reason = opt(Str(TEXT))
    mine = opt(Bool)            # failed on the fetching worker's side (its disk full): no other source helps


# ---- both ways
@message(10, "ping")
class Ping(Message):
    """Keepalive: answered by pong."""


@message(11, "pong")
class Pong(Message):
    """The answer to ping."""


# ---- manager -> worker
@message(12, "exit")
class Exit(Message):
    """Leave (final) or wait for the run's next manager."""
    reason = opt(Str(TEXT))
    final = opt(Bool)


@message(20, "fn", payload="data", payload_required=True)
class Fn(Message):
    """A pickled function, sent once per worker before the first task that calls it."""
    fid = Field(Str(NAME, 1))


@message(26, "forget")
class Forget(Message):
    """Interpreters drop a removed library they loaded (the worker keeps its bytes)."""
    fid = Field(Str(NAME, 1))


@message(21, "put", payload="data", payload_required=True)
class Put(Message):
    """One chunk of an input file for the worker's cache."""
    cn = Field(Str(NAME, 1))
    off = Field(Int())
    last = Field(Bool)
    kind = Field(OneOf("file", "tar"))
    size = Field(Int())
    level = Field(Str(SHORT))                       # cache level: task, workflow, worker
    mode = opt(Int(0, 0o7777))
    ack = opt(Bool)                                 # answer `cached` once stored (a transfer's end)


@message(22, "task", payload="args", either=("cmd", "fid"))
class Task(Message):
    """Run a command (cmd) or a Python function (fid, args: its pickled arguments; a library's
    fid for a FunctionCall, whose function name is the first argument): one of them, never both
    (a worker would take a task with neither for a call of function None)."""
    cmd = opt(Str(TEXT))
    fid = opt(Str(NAME, 1))
    id = Field(Id)
    # [cachename, remote name, kind (file, tar, url, temp, image, buffer), cache level, URL or image id]
    inputs = Field(ListOf(Row(Str(NAME, 1), Str(NAME, 1), Str(SHORT), Str(SHORT), Nullable(Str(TEXT)))))
    # [remote name, kind, cachename of a temp output or null]
    outputs = Field(ListOf(Row(Str(NAME, 1), Str(SHORT), Nullable(Str(NAME, 1)))))
    env = opt(DictOf(Str(NAME, 1), Str(TEXT)))
    res = Field(Record({k: Int() for k in RES}))
    time_max = opt(Num(0.0))
    category = Field(Str(NAME))
    pipe = opt(Bool)                                # short: may be pipelined behind a running task
    slots = opt(Int(1, 1 << 20))                    # a library call: at most this many of its library's at once
    watch = opt(ListOf(Str(NAME, 1)))               # output remote names streamed while it runs (watch)
    expect = opt(ListOf(Str(NAME, 1)))              # inputs still on their way (fetch, put): wait for them
    # the attempt number, from the second on (the first goes without: the common case costs nothing);
    # the result echoes it, so a late result of an attempt killed here is not taken for the next one
    att = opt(Int(2, 1 << 31))


@message(23, "kill")
class Kill(Message):
    """Stop a task; no result is sent for it."""
    id = Field(Id)


@message(24, "get")
class Get(Message):
    """Send this cached file back (answered by file chunks, or error)."""
    cn = Field(Str(NAME, 1))


@message(25, "unlink")
class Unlink(Message):
    """Drop this file from the worker's cache."""
    cn = Field(Str(NAME, 1))


@message(27, "fetch")
class Fetch(Message):
    """Get this file from the worker serving its cache at host:port (a PEER handshake), check
    its size and digest ("sha256:HEX" or "blake2b16:HEX", HEX a prefix of the hex digest), keep it at
    `level`; answered by `fetched`."""
    cn = Field(Str(NAME, 1))
    host = Field(Str(SHORT, 1))
    port = Field(Int(1, 65535))
    size = Field(Int())
    level = Field(Str(SHORT))
    digest = opt(Str(SHORT, 1))


# ---- worker <-> worker (a PEER handshake): the fetcher asks, the source answers with file or error
@message(42, "want")
class Want(Message):
    """fetcher -> source: send this cache entry (answered by `file` chunks, or `error`)."""
    cn = Field(Str(NAME, 1))


# ---- `vinehpc status` (a STATUS handshake) <-> manager
@message(40, "status")
class Status(Message):
    """status client -> manager: send a snapshot (the only message a status client may send)."""


@message(41, "snapshot", payload="data", payload_required=True)
class Snapshot(Message):
    """manager -> status client: the run's figures (data: a JSON object, vinehpc/status.py's
    Tracker.snapshot; JSON in a frame, not in the control part: its shape is the status module's)."""


# ---- either way: several messages in one (comm.Connection sends and opens them)
def _batch_code(v, d, fail):
    x = "x%d" % d
    return ["if type(%s) is not list or not %s or len(%s) > %d: %s" % (v, v, v, MAX_BATCH, fail),
            "for %s in %s:" % (x, v),
            "    if (type(%s) is not list or len(%s) != 3 or type(%s[0]) is not str or %s[0] not in %r"
            " or type(%s[1]) is not int or not 0 <= %s[1] <= %d or type(%s[2]) is not dict): %s"
            % (x, x, x, x, BATCHED, x, x, wire.MAX_FRAMES, x, fail)]


@message(50, "batch")
class Batch(Message):
    """Several `task` (manager -> worker) or `result` (worker -> manager) messages in one: what a
    loop turn sends one peer goes as one header and one JSON document (the issue 15 per-task
    cost), each item [name, its number of frames, its control part], the items' frames back to
    back.  Each item is then decoded and validated as the message it is (`unbatch`, `decode`)."""
    m = Field(Check("a list of 1 to %d items [name in %s, frames, control object]" % (MAX_BATCH, BATCHED),
                    code=_batch_code, shape=("batch", BATCHED, MAX_BATCH)))


def unbatch(ctl: dict, frames: list) -> list:
    """The messages inside a batch, (name, ctl, frames) each as wire.Decoder gives them, after the
    envelope is checked (its items are each decoded by their receiver, as any message)."""
    m = _envelope(ctl, ())
    out = []
    pos = 0
    for name, n, c in m.m:
        out.append((name, c, frames[pos:pos + n]))
        pos += n
    if pos != len(frames):
        raise ProtocolError("batch message: its items name %d frame(s), it carries %d" % (pos, len(frames)))
    return out


def decoded(msgs):
    """(typed message, its control dict) of each of `msgs` (wire.Decoder's), in order, each
    validated before it is given (ProtocolError where one is not).  A batch is one message: its
    envelope and every item are validated before its first item is given, so a receiver acts on
    none of a batch it refuses, and refuses it for the reason decode() gives (a valid item ahead
    of a bad one is not handled, nor refused by its handler).  A generator: what came before an
    invalid message is still handled, however the bytes were split into reads.

    A read of one message (most reads on a large fleet: one batch of a few results) is decoded
    whole at once, as a list: nothing comes before it to be handled, and a generator per read
    was part of the manager's cost per task that grew with the fleet (issue 15)."""
    if len(msgs) == 1:
        name, ctl, frames = msgs[0]
        return _items(ctl, frames) if name == "batch" else [(decode(name, ctl, frames), ctl)]
    return _decoded(msgs)


def _decoded(msgs):
    for name, ctl, frames in msgs:
        if name == "batch":
            yield from _items(ctl, frames)
        else:
            yield decode(name, ctl, frames), ctl


def _items(ctl, frames) -> list:
    """(typed message, control dict) of each item of a batch, all validated (decode()'s checks:
    the envelope knows each item's name is one of BATCHED)."""
    d = _DECODERS
    return [(d[n](c, f), c) for n, c, f in unbatch(ctl, frames)]


def _decode_batch(ctl, frames):
    """decode() of a batch: the envelope, once each item decoded (validated) as the message it is."""
    for x in unbatch(ctl, frames):
        decode(*x)
    return _envelope(ctl, ())


# ---------------------------------------------------------------- decode / encode
def decode(name: str, ctl: dict, frames: list) -> Message:
    """The typed, validated message for what wire.Decoder returned. Raises ProtocolError."""
    try:
        d = _DECODERS[name]
    except KeyError:
        raise ProtocolError("unknown message %r" % (name,)) from None
    return d(ctl, frames)


def encode(msg: Message) -> list:
    """The message as a list of buffers (header+control first, then the payload)."""
    return wire.encode(msg.CODE, msg.to_ctl(), msg.frames())


def encode_bytes(msg: Message) -> bytes:
    return b"".join(encode(msg))


def encode_named(name: str, ctl: dict | None = None, frames=()) -> list:
    """Untyped form, for senders that still build control dicts: the same buffers as encode()."""
    return wire.encode(CODES[name], ctl, frames)


# decode() of a batch checks its items too; unbatch() the envelope alone (its receivers decode each item)
_envelope, _DECODERS["batch"] = _DECODERS["batch"], _decode_batch


def decoder(**limits) -> wire.Decoder:
    """A framing decoder that knows these messages' codes."""
    return wire.Decoder(NAMES, **limits)
