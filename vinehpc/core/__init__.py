"""The manager's state machine: events in, commands out. No sockets, no threads, no clock, no files.

    cmds = core.handle(event, now)      # events.py in, commands.py out

state.py holds the Core and its event handlers, placement.py the scheduling pass, tasks.py the
per-task record and its transition table, workers.py the per-worker record and the blocklist.
"""
from . import commands, events
from .state import Core, input_names
from .tasks import TRANSITIONS, InvalidTransition, TaskState
from .workers import WorkerState

__all__ = ["Core", "WorkerState", "TaskState", "TRANSITIONS", "InvalidTransition", "events", "commands",
           "input_names"]
