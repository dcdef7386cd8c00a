#!/usr/bin/env python3
"""Where a sequential call's round trip goes, step by step: the user's thread, the manager's I/O
thread, the worker and its Python interpreter (issue 12's F4 row -- FunctionCalls to a "direct"
library -- or, with --kind python, the W4 row's PythonTasks, taken apart).

    python benchmarks/hops.py [--calls 1500] [--kind call|python] [--workers 1] [--json] [--keep]

Each process notes the time (time.perf_counter: CLOCK_MONOTONIC, one clock for every process of
the machine) at thirteen points of each call, in memory (a deque append: well under a microsecond),
written out at exit; the notes are merged and sorted, and each call's steps are the differences
between its consecutive points:

    user: build + submit          FunctionCall(...) / PythonTask(...) and submit() (its wake byte)
    I/O thread wakes              ... until the I/O thread takes the Submit off its inbox
    manager: submit turn          the Submit, the scheduling pass, its records, up to the send
    wire + worker wakes           the send, the Unix socket (--tcp: loopback TCP), the worker's select() returning
    worker: task in               read, decode and check the message, hand it to the interpreter
    interpreter wakes             the socketpair to the worker's Python interpreter, its recv() returning
    interpreter: the call         unpickle, chdir, env, the function, pickle the result, up to its send
    worker wakes                  the socketpair back, the worker's select() returning
    worker: result out            read the interpreter's result, build the result message
    wire + I/O thread wakes       the send, the Unix socket (--tcp: loopback TCP), the I/O thread's select() returning
    manager: result turn          read, decode, the core, the journal, up to the hand-over
    user thread wakes             ... until wait() returns the task

How the points get into the other processes: a `sitecustomize` module in a temporary directory put
first on the workers' PYTHONPATH wraps four worker methods, and the socket calls of the interpreters
the workers start, when VINEHPC_HOPS_DIR is set (nothing in vinehpc/ knows of it); the manager's are
wrapped here.  A machine's own sitecustomize, if any, is not loaded in the workers while this runs.
Each note also says the CPU it was taken on, so each wake across processes is reported twice: when
the woken process ran on the CPU of the one that woke it (and so waited for it to give the CPU up),
and when it ran on the other.

Also reported: each side's CPU per call (the I/O thread and the user's thread from
/proc/self/task, the worker and its interpreters from psutil), which says how much of the round
trip is work and how much is waiting for a wake-up.

Ends with one line a script can read:
HOPS kind=K link=unix|tcp calls=N total_ms=X submit_us=... io_wake_us=... (every step, by its key)
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import psutil  # noqa: E402

import standalone  # noqa: E402

import vinehpc  # noqa: E402
from vinehpc import server as _server  # noqa: E402

# The points, in the order a call passes them; a step is named by the point it ends at.
POINTS = ("U0", "U1", "Mop", "Msend", "Win", "Wrun", "Rin", "Rout", "Wback", "Wsend", "Mread", "Mhand", "U2")
STEPS = {       # point -> (key, what the step is)
    "U1": ("submit", "user: build + submit"),
    "Mop": ("io_wake", "I/O thread wakes"),
    "Msend": ("submit_turn", "manager: submit turn"),
    "Win": ("to_worker", "wire + worker wakes"),
    "Wrun": ("task_in", "worker: task in"),
    "Rin": ("interpreter_wake", "interpreter wakes"),
    "Rout": ("call", "interpreter: the call"),
    "Wback": ("worker_wake", "worker wakes"),
    "Wsend": ("result_out", "worker: result out"),
    "Mread": ("to_manager", "wire + I/O thread wakes"),
    "Mhand": ("result_turn", "manager: result turn"),
    "U2": ("user_wake", "user thread wakes"),
}
WARMUP = 50

# Recorder shared by the shim and this process: (tag, time, CPU) in memory, written out at exit.
RECORDER = r'''
import atexit as _atexit, collections as _collections, os as _os, time as _time
_DIR = _os.environ.get("VINEHPC_HOPS_DIR")
_notes = _collections.deque()     # append and popleft are atomic: the I/O thread notes too
_pc = _time.perf_counter

try:        # the CPU the note is taken on (glibc's sched_getcpu: a vDSO read, no system call)
    import ctypes as _ctypes
    _cpu = _ctypes.CDLL(None).sched_getcpu
except (OSError, AttributeError):
    def _cpu():
        return -1

def _dump():
    if _notes and _DIR:
        take = _notes.popleft
        text = "".join("%s %.7f %d\n" % take() for _ in range(len(_notes)))
        with open(_os.path.join(_DIR, "%d.txt" % _os.getpid()), "a") as f:
            f.write(text)

def mark(tag):
    _notes.append((tag, _pc(), _cpu()))
    if len(_notes) >= 65536:     # (a write per 6,000 calls or so; the rest at exit)
        _dump()

_atexit.register(_dump)
'''

# The workers' side: four methods of the worker wrapped (an ImportError -- this is not a vinehpc
# process, or an older checkout -- leaves the process as it is).
SHIM = RECORDER + r'''
def _wrap_worker():
    from vinehpc.comm import conn
    from vinehpc.worker import loop, pypool

    typed = conn.Connection.typed
    def typed_(self, data=None):
        if data is None:
            mark("Win")
        return typed(self, data)
    conn.Connection.typed = typed_

    send_now = pypool.PyPool._send_now
    def send_now_(self, r, data):
        mark("Wrun")
        return send_now(self, r, data)
    pypool.PyPool._send_now = send_now_

    readable = pypool.PyPool.readable
    def readable_(self, r):
        mark("Wback")
        return readable(self, r)
    pypool.PyPool.readable = readable_

    flush = loop.Loop._flush
    def flush_(self):
        c = self.conn
        if c is not None and c.out:
            mark("Wsend")
        return flush(self)
    loop.Loop._flush = flush_

def _wrap_interpreter():
    """A worker's Python interpreter runs pyrunner.py through runpy.run_path (a module of its own,
    made after this one ran): its socket's recv and sendall are wrapped just before."""
    import runpy
    import socket
    run_path = runpy.run_path

    def run_path_(path, *a, **k):
        if path.endswith("pyrunner.py"):
            recv, sendall = socket.socket.recv, socket.socket.sendall

            def recv_(self, *x):
                b = recv(self, *x)
                mark("Rin")
                return b

            def sendall_(self, data, *x):
                mark("Rout")
                return sendall(self, data, *x)
            socket.socket.recv, socket.socket.sendall = recv_, sendall_
        return run_path(path, *a, **k)
    runpy.run_path = run_path_

if _DIR:
    _wrap_interpreter()
    try:
        _wrap_worker()
    except ImportError:
        pass
'''


def noop(x):
    return x


def _wrap_manager(mark):
    """The I/O thread's points (this process's Server class)."""
    S = _server.Server
    op, flush, readable, hand = S._op, S._flush, S._readable, S._hand_over

    def op_(self, o, now):
        mark("Mop")
        return op(self, o, now)

    def flush_(self):
        if any(p.conn.out for p in self.dirty if not p.conn.closed):
            mark("Msend")
        return flush(self)

    def readable_(self, p):
        mark("Mread")
        return readable(self, p)

    def hand_(self):
        if self._returned:
            mark("Mhand")
        return hand(self)

    S._op, S._flush, S._readable, S._hand_over = op_, flush_, readable_, hand_


def _thread_cpu(tid):
    """(user, system) seconds of one thread of this process."""
    with open("/proc/self/task/%d/stat" % tid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    hz = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / hz, int(fields[12]) / hz


def _rounds(trace_dir, n):
    """Each call's points as (times, cpus), found in order in the merged notes from its U0 on (a
    call whose points cannot all be found in order is left out: rounds_ok says how many were
    kept).  A step is the difference of consecutive points, so "I/O thread wakes" is negative for
    a call whose Submit the I/O thread took before submit() returned."""
    notes = []
    for path in glob.glob(os.path.join(trace_dir, "*.txt")):
        with open(path) as f:
            for line in f:
                tag, t, cpu = line.split()
                notes.append((float(t), tag, int(cpu)))
    notes.sort()
    calls, cur = [], None
    for t, tag, cpu in notes:
        if tag == "U0":
            cur = [(tag, t, cpu)]
            calls.append(cur)
        elif cur is not None:
            cur.append((tag, t, cpu))
    out = []
    for call in calls[-n:]:
        # U1 (submit returned) is looked for on its own: the I/O thread may take the Submit before
        # the user's thread notes it (a GIL switch), so it is not always before Mop
        u1 = next((x for x in call if x[0] == "U1"), None)
        found, j = [], 0
        for want in POINTS:
            if want == "U1":
                found.append(u1)
                continue
            while j < len(call) and call[j][0] != want:
                j += 1
            if j == len(call):
                break
            found.append(call[j])
            j += 1
        if len(found) == len(POINTS) and u1 is not None:
            out.append(([x[1] for x in found], [x[2] for x in found]))
    return out


def _split(rounds, a, b):
    """The step ending at point b, split by whether its two ends (a, b) ran on the same CPU:
    (share of calls on the same CPU, median us there, median us elsewhere)."""
    i, k = POINTS.index(a), POINTS.index(b)
    same = [(t[k] - t[k - 1]) * 1e6 for t, c in rounds if c[i] == c[k] >= 0]
    other = [(t[k] - t[k - 1]) * 1e6 for t, c in rounds if c[i] != c[k]]
    med = (lambda xs: round(statistics.median(xs), 1) if xs else None)
    return {"same_cpu_share": round(len(same) / len(rounds), 3), "same_cpu_us": med(same), "other_cpu_us": med(other)}


@contextlib.contextmanager
def _workers(n, env, tcp, run_dir):
    """(manager, worker pids): workers started by hand over TCP (`tcp`), or the manager's own
    local workers, which come through its Unix socket (RUN_DIR/workers.sock)."""
    if tcp:
        m = vinehpc.Manager(port=0, host="127.0.0.1", run_dir=run_dir)
        with standalone.workers(m, n, env) as ws:
            yield m, [w.pid for w in ws]
        return
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = env["PYTHONPATH"]       # what LocalWorkers' processes inherit
    try:
        m = vinehpc.Manager(local_workers=n, run_dir=run_dir)
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = saved
    try:
        m.wait_for_workers(n, 60)
        yield m, m._local.pids()
    finally:
        m.close()


def run(calls, kind, workers, keep=False, tcp=False):
    work = tempfile.mkdtemp(prefix="vinehpc-hops-")
    shim, trace = os.path.join(work, "shim"), os.path.join(work, "trace")
    os.makedirs(shim)
    os.makedirs(trace)
    with open(os.path.join(shim, "sitecustomize.py"), "w") as f:
        f.write(SHIM)
    ns = {}
    exec(RECORDER, ns)          # this process's recorder: same format, same directory
    os.environ["VINEHPC_HOPS_DIR"] = trace
    ns["_DIR"] = trace
    mark = ns["mark"]
    _wrap_manager(mark)

    try:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [shim, ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        with _workers(workers, env, tcp, os.path.join(work, "run")) as (m, ws):
            if kind == "call":
                m.install_library(m.create_library_from_functions("hops", noop, exec_mode="direct"))

                def make(i):
                    return vinehpc.FunctionCall("hops", "noop", i)
            else:
                def make(i):
                    return vinehpc.PythonTask(noop, i)
            for i in range(WARMUP):
                m.submit(make(i))
                if m.wait(60) is None:
                    raise RuntimeError("no result within 60 s during the warm-up: is the worker running?")
            procs = [psutil.Process(pid) for pid in ws]
            kids = [k for p in procs for k in p.children(recursive=True)]
            io_tid, me = m._server.thread.native_id, threading.get_native_id()
            cpu0 = (_thread_cpu(io_tid), _thread_cpu(me), [p.cpu_times() for p in procs], [k.cpu_times() for k in kids])
            t0 = time.perf_counter()
            for i in range(calls):
                mark("U0")
                t = make(i)
                m.submit(t)
                mark("U1")
                t = m.wait(60)
                mark("U2")
                if t is None:
                    raise RuntimeError("call %d: no result within 60 s" % i)
            wall = time.perf_counter() - t0
            cpu1 = (_thread_cpu(io_tid), _thread_cpu(me), [p.cpu_times() for p in procs], [k.cpu_times() for k in kids])
        ns["_dump"]()
        rounds = _rounds(trace, calls)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    if not rounds:
        raise RuntimeError("no call's points were found in order (run with --keep to look at the notes)")
    us = 1e6 / calls

    cpu = {
        "io_thread": [(cpu1[0][0] - cpu0[0][0]) * us, (cpu1[0][1] - cpu0[0][1]) * us],
        "user_thread": [(cpu1[1][0] - cpu0[1][0]) * us, (cpu1[1][1] - cpu0[1][1]) * us],
        "workers": [sum(b.user - a.user for a, b in zip(cpu0[2], cpu1[2])) * us,
                    sum(b.system - a.system for a, b in zip(cpu0[2], cpu1[2])) * us],
        "interpreters": [sum(b.user - a.user for a, b in zip(cpu0[3], cpu1[3])) * us,
                         sum(b.system - a.system for a, b in zip(cpu0[3], cpu1[3])) * us],
    }
    steps = {}
    for i in range(1, len(POINTS)):
        steps[POINTS[i]] = statistics.median(t[i] - t[i - 1] for t, _ in rounds) * 1e6
    return {
        "kind": kind, "link": "tcp" if tcp else "unix", "calls": calls, "notes": os.path.join(work, "trace") if keep else None, "workers": workers, "rounds_ok": len(rounds),
        "total_ms": statistics.median(t[-1] - t[0] for t, _ in rounds) * 1e3,
        "calls_per_s": calls / wall,
        "steps_us": {STEPS[k][0]: round(v, 1) for k, v in steps.items()},
        "cpu_us_per_call": {k: [round(v[0], 1), round(v[1], 1)] for k, v in cpu.items()},
        # the wakes across processes, by where the woken one ran: on the CPU of the one that woke it
        # (it waited for that one to give the CPU up) or on the other
        "wakes": {"interpreter_wake": _split(rounds, "Wrun", "Rin"), "worker_wake": _split(rounds, "Rout", "Wback"),
                  "to_worker": _split(rounds, "Msend", "Win"), "to_manager": _split(rounds, "Wsend", "Mread")},
    }


def report(r) -> str:
    lines = ["%d sequential %s, %d worker(s) over %s; median round trip %.3f ms (%d calls with every point in order)"
             % (r["calls"], "FunctionCalls (direct library)" if r["kind"] == "call" else "PythonTasks",
                r["workers"], "loopback TCP" if r["link"] == "tcp" else "a Unix socket", r["total_ms"],
                r["rounds_ok"]), ""]
    names = dict(STEPS.values())
    w = max(len(v) for v in names.values())
    lines.append("%-*s  %8s" % (w, "step (median)", "us"))
    lines.append("%s  %s" % ("-" * w, "-" * 8))
    for k, v in r["steps_us"].items():
        lines.append("%-*s  %8.1f" % (w, names[k], v))
    lines += ["", "wake (median us)   on the waker's CPU  on the other CPU  share on the waker's"]
    for k, v in r["wakes"].items():
        lines.append("%-17s  %18s  %16s  %20.0f%%" % (k, v["same_cpu_us"], v["other_cpu_us"], 100 * v["same_cpu_share"]))
    lines += ["", "%-14s  %8s  %8s" % ("CPU per call", "user us", "sys us"), "%s  %s  %s" % ("-" * 14, "-" * 8, "-" * 8)]
    for k, (u, s) in r["cpu_us_per_call"].items():
        lines.append("%-14s  %8.1f  %8.1f" % (k.replace("_", " "), u, s))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=1500)
    ap.add_argument("--kind", choices=("call", "python"), default="call",
                    help="call: FunctionCalls to a direct library (F4); python: PythonTasks (W4)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--tcp", action="store_true",
                    help="workers started by hand, over loopback TCP (default: the manager's local workers, "
                         "through its Unix socket, as `vinehpc run` and Manager(local_workers=) have them)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the notes (printed: their directory)")
    a = ap.parse_args(argv)
    if a.calls < 1 or a.workers < 1:
        ap.error("--calls and --workers must be at least 1")
    r = run(a.calls, a.kind, a.workers, a.keep, a.tcp)
    print(json.dumps(r, indent=1) if a.json else report(r))
    print("HOPS kind=%s link=%s calls=%d total_ms=%.3f %s" % (r["kind"], r["link"], r["calls"], r["total_ms"],
                                                  " ".join("%s_us=%.1f" % kv for kv in r["steps_us"].items())))

if __name__ == "__main__":
    main()
