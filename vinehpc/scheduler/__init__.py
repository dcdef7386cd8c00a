"""Scheduling policies: given a task and the workers it fits on, pick one.

A policy is any object with `choose(ts, candidates) -> WorkerState | None`, where `ts` is the
core's TaskState (`ts.task` the user's Task, `ts.inputs` its inputs' (cachename, size, is_temp))
and `candidates` are the workers with room for the task right now.  One policy per module.
A policy may also have `least_loaded(ts) -> bool`: True when, for this task, choose() would take
the candidate with the fewest outstanding tasks (among equals the one longest at that load,
`WorkerState.since`: join order at first); the core then takes that worker from its index by load
(O(1) in the number of workers) and does not call choose().  And
`prefers_holders = True`: choose() prefers any candidate that holds one of the task's inputs (in
its `cached`) to every one that holds none, and among those takes the least loaded; the core then
offers it only the workers holding an input (from its index of cached files), or, when none fits,
takes the least loaded worker itself.
"""
from .fcfs import FCFS
from .files import PreferCachedFiles

POLICIES = {"files": PreferCachedFiles, "fcfs": FCFS}


def make(name: str):
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError("unknown scheduler %r: choose one of %s" % (name, ", ".join(sorted(POLICIES)))) from None


# TaskVine's scheduler constants (VINE_SCHEDULE_FCFS = 1, VINE_SCHEDULE_FILES = 2) -> our policies
TASKVINE = {1: "fcfs", 2: "files"}


def policy_name(scheduler) -> str:
    """The policy a scheduler names: "files"/"fcfs" (any case) or TaskVine's constant."""
    name = scheduler.lower() if isinstance(scheduler, str) else TASKVINE.get(scheduler)
    if name not in POLICIES:
        raise ValueError("scheduler %r is not supported: 'files' (VINE_SCHEDULE_FILES) or 'fcfs' (VINE_SCHEDULE_FCFS)"
                         % (scheduler,))
    return name
