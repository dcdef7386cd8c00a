"""What goes into the worker's state machine (events) and what comes out (commands).

Plain dataclasses, no I/O: state.py decides, loop.py carries out.  A task's description
from the manager (protocol.messages.Task, validated on decode) is unpacked once, here, into
a TaskSpec; nothing else reads its rows.

Interpreters (runner) are opaque keys to the state machine: whatever object the loop uses
for one long-lived Python interpreter.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..protocol import messages
from ..protocol.messages import RES
from ..protocol.names import check_cachename     # noqa: F401 (the worker's modules take it from here)


# ---------------------------------------------------------------- the task description
@dataclass(frozen=True)
class Input:
    cachename: str
    remote: str          # its name inside the task's sandbox
    kind: str            # "file", "tar", "buffer", "temp", "url" or "image"
    level: str           # cache level: "task", "workflow" or "worker"
    url: str | None      # where a "url" input is fetched from; an image's id


@dataclass(frozen=True)
class Output:
    remote: str
    kind: str            # "file": sent back; "temp": kept in the cache as `cachename`
    cachename: str | None


@dataclass      # read-only by convention: frozen would cost ~10 us a task (a setattr call per field)
class TaskSpec:
    id: int
    cmd: str | None                 # a command task's shell command, else a Python task
    fid: str | None                 # a Python task's function id
    inputs: tuple = ()              # of Input
    outputs: tuple = ()             # of Output
    env: dict = field(default_factory=dict)
    res: dict = field(default_factory=lambda: dict.fromkeys(RES, 0))
    time_max: float | None = None
    pipe: bool = False              # short Python task: may be presented to a busy interpreter
    slots: int | None = None        # a library call: at most this many calls of library `fid` run at once
    watch: tuple = ()               # remote names of outputs streamed to the manager while it runs
    error: str | None = None        # the inputs could not be understood (the task fails)
    report_start: bool = False      # tell the manager when it starts (messages.start_reported)
    expect: tuple = ()              # inputs on their way (a fetch from a peer, a put): wait for them
    att: int | None = None          # the manager's attempt number (from the second on): the result echoes it

    @classmethod
    def from_message(cls, m: messages.Task) -> "TaskSpec":
        """The manager's task message (validated on decode). Input names that could leave the
        cache make a spec whose task fails (`error`), not a protocol error."""
        inputs, error = (), None
        if m.inputs:    # (a function call has none: its spec is made without a generator per field)
            try:
                inputs = tuple(Input(check_cachename(n), remote, kind, level, url)
                               for n, remote, kind, level, url in m.inputs)
            except ValueError as e:
                error = "bad input description: %s" % e
        return cls(m.id, m.cmd, m.fid, inputs, tuple(Output(*o) for o in m.outputs) if m.outputs else (),
                   m.env or {}, dict(m.res), float(m.time_max) if m.time_max else None,
                   bool(m.pipe), m.slots, tuple(m.watch) if m.watch else (), error,
                   messages.start_reported(m.pipe, m.slots, m.inputs, m.expect),
                   tuple(m.expect) if m.expect else (), m.att)

    @property
    def python(self) -> bool:
        return self.cmd is None

    @property
    def needs_sandbox(self) -> bool:
        return self.cmd is not None or bool(self.inputs) or bool(self.outputs)


# ---------------------------------------------------------------- events (in)
@dataclass
class TaskReceived:
    spec: TaskSpec
    args: bytes | None = None       # a Python task's pickled arguments


@dataclass
class FunctionReceived:
    fid: str


@dataclass
class FileStored:
    """A file is complete in the cache (a put, a temp output kept)."""
    cachename: str
    level: str


@dataclass
class FileFailed:
    """A put could not be stored: tasks needing it fail, as the worker's fault (disk full...) or,
    worker_fault False, as the input's (a tar the worker refuses to unpack: a link out of it...)."""
    cachename: str
    reason: str
    worker_fault: bool = True


@dataclass
class InputSpoiled:
    """A cache entry was modified by a task (seal.py) and dropped (the manager is told): tasks here
    that need it and have not started wait for it to be sent again (or for the manager's kill)."""
    cachename: str
    reason: str


@dataclass
class UnlinkRequested:
    cachename: str


@dataclass
class InputReady:
    what: str            # "url" (fetched into the cache) or "image" (unpacked)
    cachename: str


@dataclass
class InputFailed:
    what: str
    cachename: str
    error: str


@dataclass
class FetchRequested:
    """The manager says: get this file from the worker at host:port (a `fetch` message)."""
    cachename: str
    host: str
    port: int
    size: int
    level: str
    digest: str | None = None


@dataclass
class PeerFetched:
    """A fetch from a peer ended: in the cache (ok), or not (reason: the manager picks another source)."""
    cachename: str
    ok: bool
    size: int = 0
    secs: float = 0.0
    reason: str | None = None
    local: bool = False             # failed on this worker's side (its disk): not the source's fault


@dataclass
class OnInterpreter:
    """A started Python task runs on this interpreter."""
    tid: int
    runner: object


@dataclass
class StartFailed:
    tid: int
    reason: str
    worker_fault: bool = False      # this worker's problem (disk full...), not the task's


@dataclass
class TaskFinished:
    """A task ended on its own: a command exited, or an interpreter returned the task's result."""
    tid: int
    exit_code: int | None = None
    signal: str | None = None
    stdout: str | None = None
    result: bytes | None = None     # a Python task's pickled result
    error: str | None = None        # a Python task's exception, summarised
    runner: object = None
    exhausted: dict | None = None   # measured at the end: over a memory/disk allocation
    sent: bool = False              # its result went to the manager already (Loop._results_now)


@dataclass
class InterpreterDied:
    tid: int | None                 # the task it was running, if any
    runner: object
    why: str


@dataclass
class Exhausted:
    """Sampling found a running task over its memory or disk allocation."""
    tid: int
    exhausted: dict


@dataclass
class KillRequested:
    tid: int


@dataclass
class Tick:
    """Time passed: time limits."""


@dataclass
class SessionEnded:
    """The manager is gone: drop every task; keep only worker-level files."""


# ---------------------------------------------------------------- commands (out)
@dataclass
class FetchURL:
    cachename: str
    url: str


@dataclass
class FetchPeer:
    """Get a file from another worker (on a helper thread); answered by PeerFetched."""
    cachename: str
    host: str
    port: int
    size: int
    digest: str | None


@dataclass
class SendFetched(PeerFetched):
    """Tell the manager how a fetch ended (`fetched`): the fields of the event it answers.  Handlers
    are looked up by exact type on both sides, so the event and the command never meet."""


@dataclass
class UnpackImage:
    cachename: str
    url: str | None


@dataclass
class StartTask:
    """Start now: a command in its sandbox, or a Python task on an idle interpreter."""
    spec: TaskSpec
    args: bytes | None
    devices: str | None             # CUDA_VISIBLE_DEVICES ("" none; None: leave the worker's)
    image: str | None               # its environment image (cache name), None: the worker's default


@dataclass
class PresentTask:
    """Pipelining: hand a Python task to `runner`, busy, to start the moment its task returns."""
    spec: TaskSpec
    args: bytes | None
    devices: str | None
    image: str | None
    runner: object


@dataclass
class KillTask:
    """Stop a running task; its end arrives as TaskFinished/InterpreterDied and is reported."""
    tid: int


@dataclass
class Requeued:
    """A presented task will not start on its interpreter (it died): undo what was prepared."""
    tid: int


@dataclass
class DropTask:
    """Forget a task without a report; stop=True: kill what runs it now (and reap it)."""
    tid: int
    stop: bool


@dataclass
class SendResult:
    """Report a task's end.  collect: it ended on its own, its outputs are sent/kept first
    (which may turn the status into "output missing")."""
    tid: int
    status: str
    reason: str | None
    wall: float
    collect: bool = False
    exit_code: int | None = None
    signal: str | None = None
    stdout: str | None = None
    result: bytes | None = None
    exhausted: dict | None = None
    worker_fault: bool = False
    sent: bool = False              # the result message went out already: only clean up
    att: int | None = None          # the task message's attempt number, echoed


@dataclass
class SendCached:
    cachename: str


@dataclass
class Unlink:
    cachename: str

