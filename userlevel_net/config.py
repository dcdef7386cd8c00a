"""Every VINEHPC_* environment variable that userlevel_net reads is read here, and only here.

Its own, not the engine's Settings (vinehpc/config.py): userlevel_net is a leaf that imports at
most vinehpc.protocol, and the tunnel proxy runs as a child process of a worker without the engine.
"""
from __future__ import annotations

import os


def take_secret() -> str:
    """VINEHPC_SECRET (a gateway's secret when no --secret-file is given), removed from the
    environment so that nothing the gateway starts inherits it; "" when unset."""
    return os.environ.pop("VINEHPC_SECRET", "")


def tunnel_loglevel() -> str:
    """VINEHPC_TUNNEL_LOGLEVEL: the tunnel proxy process's log level (default INFO)."""
    return os.environ.get("VINEHPC_TUNNEL_LOGLEVEL", "INFO")
