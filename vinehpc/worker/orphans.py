"""Processes a task leaves behind when it ends: `setsid cmd &`, double-forked daemons.

A task's process group is killed when its shell ends (process.py), but a process that made
its own session is not in it.  The worker makes itself a *child subreaper*
(prctl(PR_SET_CHILD_SUBREAPER)): every process orphaned below it -- whatever sessions it
made, however many times it forked -- becomes the worker's child instead of init's, so the
worker's own children are the only place to look (/proc/self/task/*/children: no scan of the
node's processes).  Each task runs with VINEHPC_TASK=<id> in its environment (a Python task: in
its interpreter's environment while it runs, so its children get it), which says whose an
orphan is.  A sweep (after a task ends, then once a second for a while) kills every child of
the worker that is not one of its own processes and is not marked as a task still running: one
marked as an ended task, or one without the worker's token at all (a task's process that
cleared its environment: it is killed even if its task still runs).  Zombies among them are
reaped.  The sweep runs once a second, not at each task's end (see Execution.sweep): a daemon
may outlive its task by up to a second.  The guardian (guardian.py) covers the worker's own death.
"""
from __future__ import annotations

import ctypes
import os
import signal

PR_SET_CHILD_SUBREAPER = 36
MARK = b"VINEHPC_TASK="
TOKEN = b"VINEHPC_WORKER_TOKEN="


def become_subreaper() -> bool:
    """Orphans below this process become its children (Linux >= 3.4); False where it cannot."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def children() -> list:
    """Pids of this process's children (those of each of its threads)."""
    out = []
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return out
    for t in tids:
        try:
            with open("/proc/self/task/%s/children" % t) as f:
                out.extend(int(p) for p in f.read().split())
        except (OSError, ValueError):
            pass
    return out


def whose(pid):
    """(the task id it is marked with or None, carries the worker's token); (None, False) for a
    zombie or a process gone."""
    try:
        with open("/proc/%d/environ" % pid, "rb") as f:
            env = f.read().split(b"\0")
    except OSError:
        return None, False
    mark = next((e[len(MARK):].decode("ascii", "replace") for e in env if e.startswith(MARK)), None)
    return mark, any(e.startswith(TOKEN) for e in env)


def sweep(own: set, running: set) -> int:
    """Kill (and reap) the worker's children that are left over from tasks; `own`: the worker's
    own processes (tasks' shells, interpreters, guardian...), `running`: ids (str) of the tasks
    that still run.  Returns how many it killed or reaped."""
    n = 0
    for pid in children():
        if pid in own:
            continue
        mark, ours = whose(pid)
        if mark in running or (mark is None and ours):
            continue          # a running task's, or a helper of the worker itself
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)     # a daemon's own group with it
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            os.waitpid(pid, os.WNOHANG)     # a zombie now, or at the next sweep
        except ChildProcessError:
            pass
        n += 1
    return n
