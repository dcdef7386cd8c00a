"""Where the manager's I/O thread spends its CPU per task, by phase, under benchmarks/fleet.py.

    python benchmarks/fleet_phases.py --workers 10 --tasks 30000 --idle 1
    python benchmarks/fleet_phases.py --workers 1000 --tasks 30000 --idle 1 --cprofile 30

Runs fleet.py's measurement (same arguments) with the manager's loop phases timed by the thread's
CPU clock: core events by type (each with the server carrying out its commands: `carry:` is that
part alone), reading sockets (`_readable`, which includes the result events it feeds), flushing
them, the journal's flush, the hand-over to wait(), and the garbage collector's runs on the I/O
thread.  Printed per N, in microseconds per task (the figures include the timing's own cost, about
a microsecond per timed call; compare runs of this script with each other, not with fleet.py's
mgr_ms_per_task).  --cprofile K: the I/O thread under cProfile instead, top K functions by own time
(cProfile makes everything 2-3 times slower, calls more than the rest).

Measuring instrument only: it wraps methods of vinehpc.server.Server from outside, the product
has no switch for it.
"""
from __future__ import annotations

import argparse
import collections
import cProfile
import gc
import io
import os
import pstats
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fleet  # noqa: E402
from vinehpc import journal, server  # noqa: E402

IO_THREAD = "vinehpc-manager-io"
_clock = time.thread_time_ns
acc = collections.Counter()
_event = ["?"]


def _timed(fn, key):
    def wrapper(*a, **kw):
        t = _clock()
        try:
            return fn(*a, **kw)
        finally:
            acc[key if isinstance(key, str) else key(a)] += _clock() - t
    return wrapper


def _gc_clock(phase, info, _start={}):
    if threading.current_thread().name != IO_THREAD:
        return
    if phase == "start":
        _start["t"] = _clock()
    elif "t" in _start:
        acc["gc gen%d" % info["generation"]] += _clock() - _start.pop("t")


def phases():
    S = server.Server
    feed = S._feed

    def _feed(self, event, now):
        _event[0] = type(event).__name__
        t = _clock()
        try:
            return feed(self, event, now)
        finally:
            acc["event:" + type(event).__name__] += _clock() - t
    S._feed = _feed
    S._carry = _timed(S._carry, lambda a: "  carry:" + _event[0])
    for name in ("_readable", "_flush", "_hand_over"):
        setattr(S, name, _timed(getattr(S, name), name))
    journal.Journal.flush = _timed(journal.Journal.flush, "journal.flush")
    S._run = _timed(S._run, "TOTAL")
    gc.callbacks.append(_gc_clock)


def profiled(top):
    run = server.Server._run
    prof = cProfile.Profile()

    def _run(self):
        prof.enable()
        try:
            run(self)
        finally:
            prof.disable()
    server.Server._run = _run
    return prof


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=False)
    ap.add_argument("--cprofile", type=int, default=0, metavar="K")
    a, rest = ap.parse_known_args(argv)
    prof = profiled(a.cprofile) if a.cprofile else None
    if prof is None:
        phases()
    measure = fleet.measure

    def measure_one(n, args, tmp):
        acc.clear()
        r = measure(n, args, tmp)
        if prof is None:
            print("N=%d, us of the I/O thread's CPU per task:" % n, file=sys.stderr)
            for k, v in sorted(acc.items(), key=lambda kv: -kv[1]):
                print("  %-24s %8.1f" % (k, v / 1000 / args.tasks), file=sys.stderr)
        else:
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(a.cprofile)
            print("N=%d (cumulated over the runs so far):\n%s" % (n, s.getvalue()), file=sys.stderr)
        return r
    fleet.measure = measure_one
    return fleet.main(rest)


if __name__ == "__main__":
    sys.exit(main())
