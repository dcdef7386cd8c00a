"""The manager's state machine: events in, commands out. No sockets, no threads, no clock."""
from .state import Core, WorkerState

__all__ = ["Core", "WorkerState"]
