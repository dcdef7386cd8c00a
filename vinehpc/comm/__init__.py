"""Connections: framed messages over non-blocking TCP sockets, driven by selectors loops."""
from .conn import Closed, Connection, file_chunks

__all__ = ["Closed", "Connection", "file_chunks"]
