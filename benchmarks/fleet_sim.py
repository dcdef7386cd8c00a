"""A simulated fleet of vinehpc workers: N connections to a real manager from one process.

Each simulated worker is one non-blocking socket in one selectors loop.  It speaks the real
protocol through the real worker's code: `protocol.handshake.Answerer` (the run's secret, the
MACs), `comm.Connection` (framing, `protocol.wire`), `protocol.messages.decode` (every message
from the manager is validated as the worker validates it).  It executes nothing: a task "runs"
for a modelled time (0, a fixed time, or drawn from a distribution) and returns a result whose
stdout carries the monotonic time it was sent (20 characters) (CLOCK_MONOTONIC is one clock for every process of
a machine: the user measures wait() latency from it) padded to the chosen size.

Misbehaving on purpose (options): `disconnect` workers send half of their first result and close
(the manager must requeue the task); `slow` workers read at most SLOW_BYTES a second.

Used two ways:
- as a child process, driven over stdin/stdout (`Fleet` below, for benchmarks/fleet.py and
  tests/test_fleet.py): lines "connect", "report", "quit" in; JSON lines out.
- `python benchmarks/fleet_sim.py HOST:PORT SECRET_FILE N [options]` (what Fleet starts).

Why here and not in vinehpc/: it is a measuring instrument, not part of the engine; the test imports
it from benchmarks/ as tests/test_report.py imports benchmarks/report.py (by path).
"""
from __future__ import annotations

import argparse
import collections
import errno
import heapq
import json
import os
import pickle
import random
import resource
import selectors
import socket
import subprocess
import sys
import time

if __name__ == "__main__":      # run as a script: the checkout's vinehpc, not an installed one
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vinehpc.comm import Closed, Connection              # noqa: E402  (the worker's framing)
from vinehpc.protocol import ProtocolError, handshake, messages  # noqa: E402

SLOW_BYTES = 4096        # a slow reader takes this much a second
RECONNECT_AFTER = 0.2    # a connection closed before the welcome is tried again (as `vinehpc worker` does)
KEEPALIVE_CHECK = 0.25   # how often silent workers are looked for (they ping after the keepalive interval)


def raise_nofile(want: int) -> int:
    """Raise the soft open-file limit towards `want` (up to the hard limit); returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    top = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < top:
        resource.setrlimit(resource.RLIMIT_NOFILE, (top, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def run_time(spec: str):
    """A task's modelled run time: "0", "0.01" (fixed), "exp:MEAN", "uniform:LOW:HIGH"."""
    kind, _, rest = spec.partition(":")
    if not rest:
        t = float(kind)
        return lambda: t
    args = [float(x) for x in rest.split(":")]
    if kind == "exp":
        return lambda: random.expovariate(1.0 / args[0])
    if kind == "uniform":
        return lambda: random.uniform(args[0], args[1])
    raise ValueError("run time %r: a number, exp:MEAN or uniform:LOW:HIGH" % spec)


class SimWorker:
    __slots__ = ("i", "sock", "hs", "conn", "wid", "mode", "free", "queue", "last_recv", "last_ping",
                 "ka", "killed", "reading", "joined", "att")

    def __init__(self, i, mode, cores):
        self.i = i
        self.mode = mode          # None, "disconnect" (half a result, then close), "slow" (reads slowly)
        self.free = cores
        self.queue = collections.deque()     # tasks waiting for a core: (tid, wants_start, is_python)
        self.killed = set()
        self.att = {}             # tid -> the attempt number its task message had (from the second on)
        self.sock = self.hs = self.conn = self.wid = None
        self.ka = (5.0, 30.0)
        self.reading = True
        self.joined = False


class Engine:
    def __init__(self, address, secret, n, *, cores=1, run="0", result_size=0, disconnect=0, slow=0):
        self.address = address
        self.secret = secret
        self.cores = cores
        self.run = run_time(run)
        self.zero = run in ("0", "0.0")
        self.pad = "x" * max(0, result_size - 20)
        self.sel = selectors.DefaultSelector()
        modes = ["disconnect"] * disconnect + ["slow"] * slow
        self.workers = [SimWorker(i, modes[i] if i < len(modes) else None, cores) for i in range(n)]
        # heap of (due, seq, worker, its connection, tid or None: a slow reader's pause, wants_start,
        # is_python, wall)
        self.timers = []
        self.seq = 0
        self.retry = collections.deque()   # workers to connect again: (due, i), in due order
        self.c = collections.Counter()    # figures: tasks, results, killed, lost, retries, joined...
        self.dirty = set()

    # ---------------------------------------------------------------- connections
    def connect_all(self):
        for w in self.workers:
            self._connect(w)

    def _connect(self, w):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        err = s.connect_ex(self.address)
        if err not in (0, errno.EINPROGRESS, errno.EAGAIN):     # those complete in the background
            s.close()
            return self._again(w, "connect: errno %d" % err)
        w.sock, w.hs, w.conn, w.reading = s, handshake.Answerer(self.secret, handshake.WORKER), None, True
        self.sel.register(s, selectors.EVENT_READ, w)

    def _again(self, w, why):
        self.c["retries"] += 1
        self.c["retry: " + why.split(":")[0]] += 1
        self.retry.append((time.monotonic() + RECONNECT_AFTER, w.i))

    def _close(self, w, why):
        if w.sock is None:
            return
        try:
            self.sel.unregister(w.sock)
        except (KeyError, ValueError):
            pass
        w.sock.close()
        self.dirty.discard(w)
        was_joined, w.sock, w.conn = w.joined, None, None
        w.joined = False
        w.free = self.cores                 # what it was running is lost with the connection
        w.queue.clear()
        w.killed.clear()
        w.att.clear()
        if was_joined:
            self.c["closed"] += 1
            self.c["closed: " + why[:40]] += 1
        elif why != "exit":
            self._again(w, why)       # the manager closed us before the welcome: as the real worker, again

    # ---------------------------------------------------------------- reading
    def _readable(self, w, now):
        try:
            if w.conn is None:
                data = w.sock.recv(65536)
                if not data:
                    raise Closed("closed in the handshake")
                return self._handshake(w, data, now)
            if w.mode == "slow":
                data = w.sock.recv(SLOW_BYTES)
                if not data:
                    raise Closed("connection closed by peer")
                msgs = w.conn.feed(data)
                self._pause(w, now)
            else:
                msgs = w.conn.read()
        except (Closed, ConnectionError, OSError) as e:
            return self._close(w, str(e))
        except ProtocolError as e:
            self.c["protocol errors"] += 1
            return self._close(w, "protocol error: %s" % e)
        w.last_recv = now
        for name, ctl, frames in msgs:
            self._message(w, messages.decode(name, ctl, frames), now)
            if w.sock is None:
                return

    def _pause(self, w, now):
        """A slow reader: not read again for a second."""
        w.reading = False
        try:
            self.sel.unregister(w.sock)
        except (KeyError, ValueError):
            pass
        heapq.heappush(self.timers, (now + 1.0, self._next(), w, w.conn, None, False, False, 0.0))

    def _next(self):
        self.seq += 1
        return self.seq

    def _handshake(self, w, data, now):
        m = w.hs.receive_data(data)
        if m is None:
            return
        if type(m) is messages.Hello:
            w.sock.sendall(w.hs.auth())      # a few bytes into an empty socket buffer
            return
        if m.keepalive:
            w.ka = (float(m.keepalive[0]), float(m.keepalive[1]))
        w.wid = m.wid
        w.conn = Connection(w.sock, w.hs.rest)
        w.hs = None
        w.joined = True
        w.last_recv = w.last_ping = now
        self.c["joined"] += 1
        w.conn.send("info", {"cores": self.cores, "memory": 1000 * self.cores, "disk": 1000 * self.cores, "gpus": 0,
                             "host": "sim%d" % (w.i // 64), "pid": os.getpid(), "cached": [],
                             "workdir": "/sim/%d" % w.i, "version": 2})
        self.dirty.add(w)
        for name, ctl, frames in w.conn.feed(b""):
            self._message(w, messages.decode(name, ctl, frames), now)

    def _message(self, w, m, now):
        t = type(m)
        if t is messages.Task:
            self.c["tasks"] += 1
            want = messages.start_reported(m.pipe, m.slots, m.inputs)
            if m.att:
                w.att[m.id] = m.att       # an attempt after the first: its result echoes the number
            if w.mode == "disconnect":
                return self._half_result(w, m.id)
            if w.free:
                w.free -= 1
                self._start(w, m.id, want, m.fid is not None, now)
            else:
                w.queue.append((m.id, want, m.fid is not None))
        elif t is messages.Ping:
            self.c["pinged by the manager"] += 1
            w.conn.send("pong")
            self.dirty.add(w)
        elif t is messages.Kill:
            self.c["killed"] += 1
            w.killed.add(m.id)
        elif t is messages.Exit:
            self._flush(w)
            self._close(w, "exit")
        elif t is messages.Fn:
            self.c["functions"] += 1
        elif t is not messages.Pong:
            self.c["other: " + m.NAME] += 1

    # ---------------------------------------------------------------- tasks
    def _start(self, w, tid, want, python, now):
        if self.zero:
            return self._result(w, tid, want, python, 0.0)
        t = self.run()
        heapq.heappush(self.timers, (now + t, self._next(), w, w.conn, tid, want, python, round(t, 6)))

    def _result(self, w, tid, want, python, wall):
        att = w.att.pop(tid, None) if w.att else None
        if tid in w.killed:
            w.killed.discard(tid)
        else:
            ctl = {"id": tid, "status": "success", "wall": wall, "exit_code": 0,
                   "stdout": "%020.6f%s" % (time.monotonic(), self.pad)}
            if att:
                ctl["att"] = att
            if want:
                ctl["started"] = [tid]
                if att:
                    ctl["started_att"] = {str(tid): att}
            frames = [pickle.dumps((True, None, None))] if python else ()
            w.conn.send("result", ctl, frames)
            self.dirty.add(w)
            self.c["results"] += 1
        if w.queue:
            tid, want, python = w.queue.popleft()
            self._start(w, tid, want, python, time.monotonic())
        else:
            w.free += 1

    def _half_result(self, w, tid):
        """Half of a result message on the wire, then the connection closes: the manager must
        treat the task as lost with its worker (requeued), never as a result."""
        ctl = {"id": tid, "status": "success", "wall": 0.0, "exit_code": 0, "stdout": "y" * 2000}
        data = b"".join(messages.encode_named("result", ctl))
        self._flush(w)
        try:
            w.sock.sendall(data[:len(data) // 2])
        except OSError:
            pass
        self.c["lost"] += 1
        w.mode = None                     # once: it comes back as a well-behaved worker
        self._close(w, "disconnect mid-result")
        self.retry.append((time.monotonic() + RECONNECT_AFTER, w.i))

    # ---------------------------------------------------------------- loop
    def _flush(self, w):
        try:
            done = w.conn.flush()
        except Closed as e:
            return self._close(w, str(e))
        if not done and w.reading:       # the manager is not reading: wait for room
            self.sel.modify(w.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, w)

    def _timers(self, now):
        while self.timers and self.timers[0][0] <= now:
            _, _, w, conn, tid, want, python, wall = heapq.heappop(self.timers)
            if w.conn is not conn or conn is None:
                continue              # of a connection that is gone
            if tid is None:               # a slow reader reads again
                w.reading = True
                self.sel.register(w.sock, selectors.EVENT_READ, w)
            else:
                self._result(w, tid, want, python, wall)
        while self.retry and self.retry[0][0] <= now:
            _, i = self.retry.popleft()
            if self.workers[i].sock is None:
                self._connect(self.workers[i])

    def keepalive(self, now):
        """As the real worker: ping the manager after its keepalive interval of silence."""
        for w in self.workers:
            if w.joined and now - w.last_recv > w.ka[0] and w.last_ping <= w.last_recv:
                self.c["pings"] += 1
                w.conn.send("ping")
                w.last_ping = now
                self.dirty.add(w)

    def step(self, timeout):
        now = time.monotonic()
        if self.timers:
            timeout = max(0.0, min(timeout, self.timers[0][0] - now))
        for key, ev in self.sel.select(timeout):
            w = key.data
            if w is None:
                continue
            if ev & selectors.EVENT_READ and w.sock is not None:
                self._readable(w, now)
            if ev & selectors.EVENT_WRITE and w.sock is not None:
                self.dirty.add(w)
                self.sel.modify(w.sock, selectors.EVENT_READ, w)
        self._timers(time.monotonic())
        dirty, self.dirty = self.dirty, set()
        for w in dirty:
            if w.conn is not None:
                self._flush(w)

    def report(self):
        r = dict(self.c)
        r["connected"] = sum(1 for w in self.workers if w.joined)
        r["cpu_s"] = round(time.process_time(), 3)
        return r


def serve(engine, control):
    """Drive the engine and answer the parent's lines on `control` (a file descriptor) until "quit"
    and every connection is closed."""
    os.set_blocking(control, False)
    engine.sel.register(control, selectors.EVENT_READ, None)
    buf, quitting, next_ka = b"", False, time.monotonic() + KEEPALIVE_CHECK
    while not (quitting and not any(w.sock for w in engine.workers)):
        engine.step(0.5)
        try:
            got = os.read(control, 4096)
        except BlockingIOError:
            got = None
        if got == b"":
            return          # the parent is gone
        if got:
            buf += got
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                cmd = line.decode().strip()
                if cmd == "connect":
                    engine.connect_all()
                elif cmd == "report":
                    _say(engine.report())
                elif cmd == "quit":
                    quitting = True
                    engine.retry.clear()
        now = time.monotonic()
        if now >= next_ka:
            engine.keepalive(now)
            next_ka = now + KEEPALIVE_CHECK
    _say(engine.report())


def _say(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class Fleet:
    """N simulated workers spread over `procs` child processes (one selectors loop each)."""

    def __init__(self, address, secret_file, n, *, procs=1, cores=1, run="0", result_size=0, disconnect=0,
                 slow=0, env=None):
        self.n = n
        procs = max(1, min(procs, n))
        self.procs = []
        raise_nofile(n + 1024)       # inherited by the children: their sockets
        env = dict(os.environ if env is None else env)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        for k in range(procs):
            share = n // procs + (1 if k < n % procs else 0)
            bad = [disconnect // procs + (1 if k < disconnect % procs else 0),
                   slow // procs + (1 if k < slow % procs else 0)]
            args = [sys.executable, os.path.abspath(__file__), "%s:%d" % address, secret_file, str(share),
                    "--cores", str(cores), "--run", run, "--result-size", str(result_size),
                    "--disconnect", str(bad[0]), "--slow", str(bad[1])]
            self.procs.append(subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True))
        for p in self.procs:
            if p.stdout.readline().strip() != '"ready"':
                raise RuntimeError("a fleet process did not start")

    def _tell(self, line):
        for p in self.procs:
            p.stdin.write(line + "\n")
            p.stdin.flush()

    def connect(self):
        self._tell("connect")

    def report(self) -> dict:
        """The children's figures, summed."""
        self._tell("report")
        total = collections.Counter()
        for p in self.procs:
            total.update(json.loads(p.stdout.readline()))
        return dict(total)

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the fleet processes have used so far: the harness's own cost,
        measured apart from the manager's."""
        total = 0.0
        for p in self.procs:
            try:
                with open("/proc/%d/stat" % p.pid) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            except (OSError, IndexError, ValueError):
                pass
        return total

    def close(self, timeout=30.0) -> dict:
        """Ask the children to end once the manager has closed their connections; their last figures."""
        total = collections.Counter()
        try:
            self._tell("quit")
        except (BrokenPipeError, OSError):
            pass
        for p in self.procs:
            try:
                out, _ = p.communicate(timeout=timeout)
                if out.strip():
                    total.update(json.loads(out.strip().splitlines()[-1]))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        return dict(total)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("address")
    ap.add_argument("secret_file")
    ap.add_argument("n", type=int)
    ap.add_argument("--cores", type=int, default=1)
    ap.add_argument("--run", default="0")
    ap.add_argument("--result-size", type=int, default=0)
    ap.add_argument("--disconnect", type=int, default=0)
    ap.add_argument("--slow", type=int, default=0)
    a = ap.parse_args(argv)
    host, port = a.address.rsplit(":", 1)
    with open(a.secret_file) as f:
        secret = f.read().strip()
    raise_nofile(a.n + 256)
    e = Engine((host, int(port)), secret, a.n, cores=a.cores, run=a.run, result_size=a.result_size,
               disconnect=a.disconnect, slow=a.slow)
    _say("ready")
    serve(e, sys.stdin.fileno())


if __name__ == "__main__":
    main()
