"""The worker's warm interpreters (worker/pypool.py) with real interpreter processes."""
from __future__ import annotations

import pickle
import selectors
import time

import pytest

from vinehpc.task import PythonTask
from vinehpc.worker.events import OnInterpreter, SendResult, StartFailed, StartTask, TaskSpec
from vinehpc.worker.execution import Execution
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


class _Conn:
    """What Execution sends a result on (the manager's connection), kept."""

    def __init__(self):
        self.sent = []

    def send(self, name, ctl=None, frames=()):
        self.sent.append((name, ctl, list(frames)))


@pytest.mark.timeout(60)
def test_a_task_sent_before_its_start_runs_there_or_fails_as_that_start_would(tmp_path):
    """Execution.prestart (a plain call on its way to an interpreter before the state machine's
    StartTask): the start then takes that interpreter -- no second message, no second interpreter
    -- and its result is the message report() sends; sending to an interpreter that died (its death
    not read yet) fails the start as the worker's fault, as a start's own send would."""
    sel = selectors.DefaultSelector()
    pool = PyPool(sel, max_runners=1, workdir=str(tmp_path))
    ex = Execution(sel, pool, None, None, workdir=str(tmp_path), hostname="h")
    res = {"cores": 1, "memory": 0, "disk": 0, "gpus": 0}
    try:
        t = PythonTask(abs, -7)          # (a builtin: the interpreter imports nothing of the tests)
        t._check()
        ex.fns[t._fid] = t._fbytes
        spec = TaskSpec(1, None, t._fid, res=res)
        assert ex.prestart(spec, t._abytes, None)
        [ev] = ex.start(StartTask(spec, t._abytes, None, None))
        assert isinstance(ev, OnInterpreter) and ev.runner is pool.runners[0] and len(pool.runners) == 1
        [(tid, payload)] = _results(pool, ev.runner, 1)
        assert tid == 1 and pickle.loads(payload[0])[:2] == (True, 7)
        conn = _Conn()
        ex.send_plain_result(conn, 1, None, "", payload[0], 0.25, started=[1])
        [(name, ctl, frames)] = conn.sent
        assert name == "result" and frames == [payload[0]]
        assert (ctl["id"], ctl["status"], ctl["wall"], ctl["started"]) == (1, "success", 0.25, [1])
        assert ctl["measured"]["wall"] == 0.25             # as report() measures it
        ex.report(SendResult(1, "success", None, 0.25, collect=True, result=payload[0], sent=True), conn)
        assert len(conn.sent) == 1 and 1 not in ex.handles  # cleaned up, not sent twice

        dead = ev.runner
        dead.proc.kill()
        dead.proc.wait(30)                                  # dead; the pool has not read its death yet
        spec2 = TaskSpec(2, None, t._fid, res=res)
        assert ex.prestart(spec2, t._abytes, None)
        out = ex.start(StartTask(spec2, t._abytes, None, None))
        [f] = [e for e in out if isinstance(e, StartFailed)]
        assert f.tid == 2 and f.worker_fault and 2 not in ex.prestarted
    finally:
        pool.close()
        for x in list(pool.runners):
            x.proc.kill()
