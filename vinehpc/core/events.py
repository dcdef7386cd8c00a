"""What happens to the manager, as the core hears it: one dataclass per event.

The server (sockets, timers) and the Manager (user calls, through the server's inbox) turn
what they see into these and pass them to `Core.handle(event, now)`.  Slotted: results and
schedule passes are the hot path.
"""
from __future__ import annotations

from dataclasses import dataclass

from .tasks import TaskState, task_resources


def Submit(task, inputs, on_start=None, on_done=None, pin=None) -> TaskState:
    """A new task, from Manager.submit: the event is the task's own TaskState (tasks.py), made on
    the caller's thread -- one object a queued task, not an event and then a state (a burst of
    100,000 submits waits in the server's inbox: the garbage collector walked both, issue 15).

    `task`: the user's Task (id, outputs and function already set by Manager.submit); `inputs`:
    per input (cachename, size, is_temp), or None (made by a task: resolved later); `on_start`:
    called (on the I/O thread) with the task when it is dispatched; `on_done`: called with the
    finished task instead of handing it to wait(); `pin`: the only worker it may run on."""
    return TaskState(task, inputs, task_resources(task), pin=pin, on_start=on_start, on_done=on_done)


@dataclass(slots=True)
class Resumed:
    task: object                 # completed in an earlier run: known (its temps can be re-made), not run
    on_done: object = None


@dataclass(slots=True)
class Cancel:
    tid: int
    reason: str = "cancelled by the user"


@dataclass(slots=True)
class Drain:
    grace: float                 # seconds running tasks get before they are cancelled


@dataclass(slots=True)
class WorkerJoined:
    wid: int
    info: dict                   # cores, memory, disk, gpus, host, cached, pid...


@dataclass(slots=True)
class WorkerLost:
    wid: int
    reason: str


@dataclass(slots=True)
class TaskResult:
    wid: int
    tid: int
    info: dict                   # status, exit_code, reason, wall, stdout, measured, temps, worker_fault, exhausted,
                                 # started (ids: TasksStarted riding on the result)
    output: bytes | None = None  # a PythonTask's pickled result


@dataclass(slots=True)
class TasksStarted:
    wid: int
    ids: list                    # tasks that started on worker wid (a `started` message); stale ids are ignored
    att: dict | None = None      # {str(id): attempt} of those sent again (absent: first attempts)


@dataclass(slots=True)
class FileCached:
    wid: int
    cachename: str
    size: int = 0


@dataclass(slots=True)
class TransferDone:
    wid: int                     # a `fetched` from this worker: a transfer to it ended
    cachename: str
    ok: bool
    size: int = 0
    secs: float | None = None    # the worker's measure
    reason: str | None = None
    mine: bool = False           # the failure was the fetching worker's own (its disk): not retried there


@dataclass(slots=True)
class FileFetched:
    cachename: str
    path: str                    # the manager's copy


@dataclass(slots=True)
class FileResolved:
    file_id: int                 # a file made by a task, named on the I/O side after ResolveFile
    cachename: str | None
    size: int = 0
    error: str | None = None     # it could not be read


@dataclass(slots=True)
class PutFailed:
    wid: int
    cachename: str


@dataclass(slots=True)
class FileDropped:
    """A worker dropped its copy of a file (a task modified it): tasks there that need it go back
    to the queue, not blamed on anyone; it is sent again with the next task that needs it there."""
    wid: int
    cachename: str
    reason: str


@dataclass(slots=True)
class FetchFailed:
    cachename: str


@dataclass(slots=True)
class Undeclare:
    cachename: str               # the user is done with this file: workers drop their copies


@dataclass(slots=True)
class BlockHost:
    host: object                 # a host name, or a worker id
    seconds: float | None = None  # None: the default; 0: until UnblockHost
    why: str = "blocked by the user"


@dataclass(slots=True)
class UnblockHost:
    host: object


@dataclass(slots=True)
class ForgetFunction:
    """A library was removed (Manager.remove_library): workers' interpreters drop what they loaded
    of it; its bytes stay on the workers, so calls already submitted still run."""
    fid: str


@dataclass(slots=True)
class SlowMultiplier:
    category: str | None         # None: every category
    multiplier: float


@dataclass(slots=True)
class Tick:
    """Once a second: fast abort."""


@dataclass(slots=True)
class Schedule:
    """After each batch of events: dispatch what can start, and end a drain that is over.
    `part`: end after this many starts (0: the whole pass); the core then sets `pass_left`, and
    the next Schedule goes on with the same pass (its caller carries each part's commands first)."""
    part: int = 0


TICK = Tick()
SCHEDULE = Schedule()
