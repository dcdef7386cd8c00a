"""Run a tasks.py as __main__ inside a launcher's run context (`vinehpc run`, `vinehpc pilot`).

Below both the command line (vinehpc/cli.py) and the launchers (launcher/), which call it.
"""
from __future__ import annotations

import os
import runpy
import signal
import sys
import traceback

from . import _context, task


def run_script(script: str, argv: list, ctx, sigterm=None) -> int:
    """Run `script` as __main__ inside the run context `ctx`; returns the exit status."""
    script_dir = os.path.dirname(os.path.abspath(script))
    task.pickle_by_value_under(script_dir)
    prev = _context.set_current(ctx)
    old_argv, old_path = sys.argv, list(sys.path)
    sys.argv = [script] + list(argv)
    sys.path.insert(0, script_dir)
    old_term = signal.signal(signal.SIGTERM, sigterm or _raise_sigterm)
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    except KeyboardInterrupt:
        print("\nvinehpc run: interrupted; stopping workers", file=sys.stderr)
        code = 130
    except task.Resumable as e:
        print("vinehpc: %s" % e, file=sys.stderr)
        code = 75
    except BaseException:
        traceback.print_exc()
        print("vinehpc run: %s raised an exception (above); workers stopped" % script, file=sys.stderr)
        code = 1
    finally:
        try:
            ctx.shutdown()
        finally:
            signal.signal(signal.SIGTERM, old_term)
            _context.set_current(prev)
            sys.argv, sys.path[:] = old_argv, old_path
    return code


def _raise_sigterm(signum, frame):
    raise SystemExit(143)
