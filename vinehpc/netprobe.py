"""Manager.probe_network(): the outbound-access probe (userlevel_net.probe.probe) once on every
connected worker.  The probe itself is a leaf's pure function that runs on the worker; building
the tasks, pinning them and collecting their answers is the manager's side, here."""
from __future__ import annotations

import threading
import time

from userlevel_net.probe import parse_target, probe

from .task import PythonTask


def probe_workers(manager, targets=(), *, timeout: float = 3.0, deadline: float | None = None) -> list:
    """Run probe(targets) once on each connected worker; returns one dict per worker (with
    "worker" and "host" added), in the order of manager.workers().

    Each task is submitted with manager.submit(task, worker=ID, on_done=callback): it runs only
    on that worker and comes back through the callback, never through wait(), so the user's
    own tasks are not disturbed.  A task that fails, or does not return within `deadline`
    seconds (default: a margin over the probe's own worst case), is reported as a row with
    "error" and is cancelled."""
    targets = [t if isinstance(t, str) else "%s:%d" % tuple(t) for t in targets]
    for t in targets:
        parse_target(t)   # bad targets fail here, not once per worker
    if deadline is None:
        deadline = 3 * timeout + 30.0
    workers = list(manager.workers())
    cond = threading.Condition()
    finished = {}

    def on_done(task):   # on the manager's I/O thread: keep it short
        with cond:
            finished[task.id] = task
            cond.notify_all()
    pending = {}
    rows = {}
    for w in workers:
        t = PythonTask(probe, targets, timeout=timeout)
        try:
            pending[manager.submit(t, worker=w["id"], on_done=on_done)] = w
        except Exception as e:
            rows[w["id"]] = {"worker": w["id"], "host": w.get("host"), "node": w.get("host"),
                             "error": "cannot submit the probe: %s" % e}
    end = time.monotonic() + deadline
    with cond:
        while len(finished.keys() & pending.keys()) < len(pending):
            left = end - time.monotonic()
            if left <= 0:
                break
            cond.wait(left)
        done = {tid: finished[tid] for tid in pending if tid in finished}
    for tid, w in pending.items():
        base = {"worker": w["id"], "host": w.get("host")}
        t = done.get(tid)
        if t is None:
            try:
                manager.cancel(tid)
            except Exception:
                pass
            rows[w["id"]] = dict(base, node=w.get("host"),
                                 error="no answer from the worker within %g s (probe cancelled)" % deadline)
            continue
        exc = t.exception
        if exc is None and isinstance(t.output, dict):
            rows[w["id"]] = dict(t.output, **base)
        else:
            cause = exc.__cause__ if exc is not None and exc.__cause__ is not None else exc
            rows[w["id"]] = dict(base, node=t.hostname or w.get("host"),
                                 error="probe failed: %s" % (cause if cause is not None else t.output))
    return [rows[w["id"]] for w in workers if w["id"] in rows]
