"""The run a Manager() belongs to, when a launcher (vinehpc run / pilot) set one up.

A context has manager_options() -> ManagerOptions, manager_started(m), manager_closed(m) and
open_manager() -> the Manager an Executor() should share, or None.  Launchers set it; the
Manager only reads it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_current = None


@dataclass(frozen=True)
class ManagerOptions:
    """What a launcher's run gives each Manager() created in it; a Manager's own arguments win.
    The defaults are those of a Manager created outside any run."""
    host: str | None = None          # address to bind (None: the Manager's default)
    secret: str | None = None        # the run's secret (None: Settings.secret, else a fresh one)
    address: str | None = None       # the address workers are told (None: host:port)
    run_dir: str | None = None       # stable across resubmissions (None: a fresh one)
    sock: Any = None                 # a listening socket the launcher opened (None: the Manager opens one)
    final_exit: bool = True          # workers exit when the manager closes (False: a pilot's serve the next)
    resume: bool = False             # default of Manager(resume=)
    write_secret: bool = True        # write RUN_DIR/secret for `vinehpc worker --secret-file`
    tunnel: Any = None               # default of Manager(tunnel=): True, "HOST:PORT" or None
    settings: Any = None             # the launcher's vinehpc.config.Settings (None: read the environment)
    metrics_port: Any = None         # default of Manager(metrics_port=): `vinehpc run --metrics-port`
    local: bool = False              # the run's workers are on this machine: listen on RUN_DIR/workers.sock too
    # TLS (Manager(ssl=)): None lets the Manager's own argument decide; anything else is the run's and
    # wins (a pilot's workers were started knowing it): True, a (key, cert) pair, or False
    ssl: Any = None


def current():
    return _current


def set_current(ctx):
    global _current
    prev, _current = _current, ctx
    return prev
