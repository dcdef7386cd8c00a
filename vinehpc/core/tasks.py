"""The core's record of one task, and the one function that moves it between states.

The user's Task is only read here (what it asks for); what the core decides and learns
about it lives in a TaskState, and the results are copied onto the Task when it is
returned.  Like distributed's scheduler, a move the table does not allow raises: a bug
shows where it happens instead of as a task that hangs or runs twice.

    waiting  inputs not available yet (made by a task not finished, a lost temp, a name
             being resolved)
    ready    in the queue
    running  sent to a worker (its inputs, function and task queued on that connection)
    done     handed back (success, failure, cancelled); the record is dropped
"""
from __future__ import annotations

TRANSITIONS = {
    "new": ("waiting", "ready", "done"),
    "waiting": ("ready", "waiting", "done"),
    "ready": ("running", "waiting", "done"),
    "running": ("ready", "done"),
    "done": (),
}


# shared by every task that has none (most): two empty sets per queued task were a third of the
# core's memory for a million queued tasks (issue 15); a task that needs one gets its own set
EMPTY = frozenset()


class InvalidTransition(RuntimeError):
    pass


def task_resources(task) -> dict:
    r = task.resources
    return {"cores": r["cores"] or 1, "memory": r["memory"] or 0, "disk": r["disk"] or 0, "gpus": r["gpus"] or 0}


class TaskState:
    __slots__ = ("task", "tid", "state", "wid", "res", "whole", "alloc_version", "grown", "tries", "exhaustions",
                 "avoid", "passed_since", "warned", "inputs", "dispatched_at", "started", "pin", "on_start", "on_done",
                 "attempts", "worker", "host", "addr", "exit_code", "stdout", "wall", "measured", "output", "lost_with", "tiny")

    def __init__(self, task, inputs, res, pin=None, on_start=None, on_done=None):
        self.task = task
        self.tid = task.id
        self.state = "new"
        self.wid = None              # the worker it runs on
        self.res = res               # what its current (or next) attempt gets: cores, memory, disk, gpus
        self.whole = EMPTY           # resources it gets a whole worker's worth of (no learnt guess yet)
        self.alloc_version = None    # the category version `res` was decided at (decided again as it learns)
        self.grown = False           # res was enlarged after an exhaustion: kept, not decided again
        self.tries = 0               # failed attempts spent of task.retries
        self.exhaustions = 0
        self.avoid = None            # a worker it failed on for the worker's sake: elsewhere if possible
        self.passed_since = None     # when a task behind it first started before it
        self.warned = False          # "no worker is large enough" said once
        self.inputs = inputs         # [(cachename, size, is_temp) or None], in task.inputs order
        self.dispatched_at = None
        self.started = False         # the current attempt's `started` is logged
        self.pin = pin
        self.on_start = on_start
        self.on_done = on_done
        self.attempts = 0
        self.tiny = False            # counted in core.tiny_out while it runs (placement.TINY_BUDGET)
        self.lost_with = EMPTY       # workers lost while it ran there (a poison task kills each it runs on)
        self.worker = self.host = self.addr = None    # where its last result came from (addr: host:port)
        self.exit_code = self.stdout = self.wall = self.measured = self.output = None

    def __repr__(self):
        return "<TaskState %s %s on %s>" % (self.tid, self.state, self.wid)


def transition(ts, to):
    """The only place a task's state changes."""
    if to not in TRANSITIONS[ts.state]:
        raise InvalidTransition("task %s: %s -> %s is not allowed" % (ts.tid, ts.state, to))
    ts.state = to
