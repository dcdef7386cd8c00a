"""The end of a pilot: tell the workers that come back to the listening socket to exit.

Between managers a pilot's workers reconnect; when the script is over, a manager-less server
in release mode answers each of them with "exit".  In the engine (launcher/pilot.py calls
it) because it drives the server and core directly.
"""
from __future__ import annotations

import time

from .core import Core
from .journal import Journal
from .server import Server


def release_workers(sock, secret: str, expected: int, *, staging: str, timeout: float = 5.0, tls=None) -> int:
    """Answer workers connecting to `sock` with "exit" until `expected` have been released or
    `timeout` seconds passed; returns how many were released.  Those that do not come back
    in time (still starting, or lost) find the socket closed afterwards, and a pilot's worker
    exits on a refused connection.  `tls`: the run's (key, cert) when its workers speak TLS."""
    from .protocol.tls import ServerTLS
    srv = Server(Core(), host="", port=0, secret=secret, journal=Journal(None), staging=staging,
                 keepalive_interval=5.0, keepalive_timeout=30.0, sock=sock, release=True,
                 tls=ServerTLS(*tls) if tls else None)
    srv.start()
    deadline = time.monotonic() + timeout
    with srv.cond:
        while srv.released < expected and time.monotonic() < deadline:
            srv.cond.wait(min(1.0, max(0.0, deadline - time.monotonic())))
    srv.stop("pilot over")
    srv.stopped.wait(10)
    return srv.released
