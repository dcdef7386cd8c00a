"""Connections: framed messages over non-blocking TCP (or Unix) sockets, driven by selectors loops."""
from .conn import Closed, Connection, file_chunks, unix_address

__all__ = ["Closed", "Connection", "file_chunks", "unix_address"]
