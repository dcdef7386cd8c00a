"""Run a tasks.py as __main__ inside a launcher's run context (`vinehpc run`, `vinehpc pilot`).

Below both the command line (vinehpc/cli.py) and the launchers (launcher/), which call it.
"""
from __future__ import annotations

import os
import runpy
import signal
import sys
import traceback

from . import _context, futures, task


def run_script(script: str, argv: list, ctx, sigterm=None) -> int:
    """Run `script` as __main__ inside the run context `ctx`; returns the exit status."""
    script_dir = os.path.dirname(os.path.abspath(script))
    task.pickle_by_value_under(script_dir)
    prev = _context.set_current(ctx)
    old_argv, old_path = sys.argv, list(sys.path)
    sys.argv = [script] + list(argv)
    sys.path.insert(0, script_dir)
    old_term = signal.signal(signal.SIGTERM, sigterm or _raise_sigterm)
    try:
        code = _exit_code(lambda: runpy.run_path(script, run_name="__main__"), script)
        if code == 0:
            # the script's end is its program's end: pending Executor calls finish, as at the
            # exit of `python tasks.py`, before the run's workers are stopped
            code = _exit_code(futures.shutdown_all, script)
    finally:
        try:
            ctx.shutdown()
        finally:
            signal.signal(signal.SIGTERM, old_term)
            _context.set_current(prev)
            sys.argv, sys.path[:] = old_argv, old_path
    return code


def _exit_code(step, script) -> int:
    """Run step() (the script, then what ends it); its outcome as an exit status."""
    try:
        step()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print("\nvinehpc run: interrupted; stopping workers", file=sys.stderr)
        return 130
    except task.Resumable as e:
        print("vinehpc: %s" % e, file=sys.stderr)
        return 75
    except BaseException:
        traceback.print_exc()
        print("vinehpc run: %s raised an exception (above); workers stopped" % script, file=sys.stderr)
        return 1
    return 0


def _raise_sigterm(signum, frame):
    raise SystemExit(143)
