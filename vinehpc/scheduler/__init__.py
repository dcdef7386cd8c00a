"""Scheduling policies: given a task and the workers it fits on, pick one.

A policy is any object with `choose(ts, candidates) -> WorkerState | None`, where `ts` is the
core's TaskState (`ts.task` the user's Task, `ts.inputs` its inputs' (cachename, size, is_temp))
and `candidates` are the workers with room for the task right now.  One policy per module.
"""
from .fcfs import FCFS
from .files import PreferCachedFiles

POLICIES = {"files": PreferCachedFiles, "fcfs": FCFS}


def make(name: str):
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError("unknown scheduler %r: choose one of %s" % (name, ", ".join(sorted(POLICIES)))) from None
