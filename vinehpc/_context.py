"""The run a Manager() belongs to, when a launcher (vinehpc run / pilot) set one up.

A context has manager_options() -> dict (host, secret, run_dir, ...), manager_started(m),
manager_closed(m) and open_manager() -> the Manager an Executor() should share, or None.  Launchers set it; the Manager only reads it.
"""
_current = None


def current():
    return _current


def set_current(ctx):
    global _current
    prev, _current = _current, ctx
    return prev
