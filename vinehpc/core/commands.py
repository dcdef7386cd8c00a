"""What the core asks the server to do: one dataclass per command (see events.py).

The server carries them out in order; a command for a worker that is gone is dropped.  A journal
record is the one command that is no class: the record itself, a dict (three or four a task: a
wrapper object each was a microsecond of the manager's I/O thread per record, issue 15).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class SendFunction:
    wid: int
    fid: str
    data: bytes


@dataclass(slots=True)
class PutFile:
    wid: int
    file: object                 # the File (buffer: its bytes; file or directory: its path)
    cachename: str
    path: str | None = None      # a temp: the manager's fetched copy
    ack: bool = False            # a transfer (core/transfers.py): the worker answers `cached` once stored


@dataclass(slots=True)
class Fetch:
    wid: int                     # this worker gets the file from the worker serving at host:port
    cachename: str
    host: str
    port: int
    size: int
    level: str                   # the cache level it keeps it at
    digest: str | None           # "sha256:HEX" to check the copy against (None: its size alone)


@dataclass(slots=True)
class SendTask:
    wid: int
    tid: int
    spec: dict                   # the wire task message (shares the core's dicts: encode it, do not keep it)
    payload: bytes | None        # a PythonTask's pickled arguments
    outputs: list                # [(File, remote)]: where the outputs that come back go


@dataclass(slots=True)
class DropFunction:
    wid: int
    fid: str


@dataclass(slots=True)
class KillTask:
    wid: int
    tid: int


@dataclass(slots=True)
class GetFile:
    wid: int
    cachename: str               # fetch this temp to the manager (answered by FileFetched/FetchFailed)


@dataclass(slots=True)
class UnlinkFile:
    wid: int
    cachename: str               # drop this file from the worker's cache (Manager.undeclare_file)


@dataclass(slots=True)
class ResolveFile:
    file: object                 # name this task-made file (answered by FileResolved)


@dataclass(slots=True)
class TaskStarted:
    task: object                 # dispatched (only for tasks submitted with on_start)
    on_start: object


@dataclass(slots=True)
class TaskFinished:
    task: object                 # its results are on it: hand it to the user
    on_done: object = None       # ... through this callback instead of wait()


@dataclass(slots=True)
class Drained:
    """The drain is over: nothing runs, nothing more will start."""
