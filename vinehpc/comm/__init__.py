"""Connections: framed messages over non-blocking TCP sockets, driven by selectors loops."""
from .conn import Closed, Connection

__all__ = ["Closed", "Connection"]
