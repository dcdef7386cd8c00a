"""The worker's warm interpreters (worker/pypool.py) with real interpreter processes."""
from __future__ import annotations

import selectors
import time

import pytest

from vinehpc.task import PythonTask
from vinehpc.worker.pypool import PyPool


def identity(x):
    return x


def _results(pool, runner, n, timeout=30.0):
    """Read `runner` until `n` tasks have returned; [(tid, payload)]."""
    sel = selectors.DefaultSelector()
    sel.register(runner.sock, selectors.EVENT_READ)
    out, deadline = [], time.monotonic() + timeout
    try:
        while len(out) < n:
            left = deadline - time.monotonic()
            assert left > 0, "the interpreter returned %d of %d tasks within %.0f s" % (len(out), n, timeout)
            if sel.select(left):
                out += pool.readable(runner)
    finally:
        sel.close()
    return out


@pytest.mark.timeout(60)
def test_a_task_presented_to_an_interpreter_that_is_already_idle_runs_and_frees_it(tmp_path):
    """The worker's state may present a task to an interpreter whose current task has already
    returned in the same read (the loop hands the state those results one at a time). The
    interpreter is idle then: the task must start at once, and the interpreter must be free again
    after it, not stay marked busy (every later task then spawned a new interpreter: W1 of
    benchmarks/throughput.py ran 3x slower)."""
    pool = PyPool(selectors.DefaultSelector(), max_runners=1, workdir=str(tmp_path))
    try:
        t = PythonTask(identity, 0)
        t._check()
        def run(tid, after=None):
            r = pool.run(tid, t._fid, t._fbytes, t._abytes, None, {}, after=after)
            pool.flush()                       # (the worker's loop does, once per turn)
            return r
        r = run(1)
        run(2, after=r)                        # pipelined behind task 1
        assert sorted(tid for tid, _ in _results(pool, r, 2)) == [1, 2]
        assert r.tid is None                   # both returned: idle
        assert run(3, after=r) is r            # the late presentation
        assert r.tid == 3                      # ... starts now
        assert [tid for tid, _ in _results(pool, r, 1)] == [3]
        assert r.tid is None and not r.queued
        assert run(4) is r and len(pool.runners) == 1    # reused, no new interpreter
        assert [tid for tid, _ in _results(pool, r, 1)] == [4]
    finally:
        pool.close()
        for x in list(pool.runners):
            x.proc.kill()
