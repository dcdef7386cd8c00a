"""The worker's main loop: one selectors loop over the manager connection, the task
processes (pidfds), the Python interpreters (socketpairs) and a wake-up socket for URL
fetches done on helper threads.

A task's life here: received -> inputs present (URL fetched if needed) -> queued until
cores/memory/disk/gpus fit -> running in its sandbox -> outputs collected -> result sent.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import logging
import os
import selectors
import shutil
import signal
import socket
import tempfile
import time

from ..comm import Closed, Connection, file_chunks
from ..protocol import ProtocolError, handshake, wire
from .. import config
from . import monitor, resources
from .cache import Cache, check_cachename
from .pypool import PyPool
from .process import Guardian
from .runs import RES, Run, Running

log = logging.getLogger("vinehpc.worker")


class ManagerGone(Exception):
    pass


class SessionOver(Exception):
    """The manager ended its workflow; the run goes on (a pilot's next manager)."""


class Worker(Running):
    def __init__(self, address: str, secret: str, *, cores=None, memory=None, disk=None, gpus=None,
                 workdir=None, connect_timeout=60.0, reconnect=True, exit_on_refused=False, image=None):
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError("manager address must be HOST:PORT, got %r" % address)
        self.addr = (host.strip("[]"), int(port))
        self.secret = secret
        self.own_workdir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="vinehpc-worker-", dir=config.worker_dir_root())
        os.makedirs(self.workdir, exist_ok=True)
        ids = resources.gpu_ids()
        if gpus is not None:                     # given: those of the detected devices, else 0..gpus-1
            ids = ids[:gpus] if len(ids) >= gpus else [str(i) for i in range(gpus)]
        self.total = resources.detect(self.workdir, cores=cores, memory=memory, disk=disk, gpus=len(ids))
        self.gpu_ids = ids
        self.gpu_free = list(ids)     # device ids not held by a running task (CUDA_VISIBLE_DEVICES per task)
        self.cache = Cache(os.path.join(self.workdir, "cache"))
        self.sandboxes = os.path.join(self.workdir, "tasks")
        os.makedirs(self.sandboxes, exist_ok=True)
        self.connect_timeout = connect_timeout
        self.reconnect = reconnect
        self.exit_on_refused = exit_on_refused   # a pilot's worker: a refused connection means the run is over
        self.refused = False
        self.sel = selectors.DefaultSelector()
        self._wr, self._ww = socket.socketpair()
        self._wr.setblocking(False)
        self.sel.register(self._wr, selectors.EVENT_READ, ("wake", None))
        self.guard = Guardian()
        self.pool = PyPool(self.sel, max_runners=max(1, self.total["cores"]), workdir=self.workdir, guard=self.guard)
        self.fetcher = cf.ThreadPoolExecutor(4, thread_name_prefix="vinehpc-fetch")
        self.fetched = collections.deque()
        self.fetching = {}       # cachename -> [runs waiting]
        self.fns = {}            # fid -> bytes
        self.images = {}         # image cache name -> unpacked LocalEnv (sysimage_tools.deploy)
        self.default_image = None    # --image: every task without its own image runs in this one
        if image is not None:
            from sysimage_tools.deploy import ensure_local
            from sysimage_tools.image import ImageError
            try:
                self.default_image = ensure_local(image)
            except ImageError as e:
                raise ValueError("environment image %s: %s" % (image, e)) from None
        self.put_errors = {}     # cachename -> why it could not be stored
        self.runs = {}           # tid -> Run
        self.queue = collections.deque()
        self.presented = {}      # busy interpreter -> the Run it will start next (pipelining)
        self.used = dict.fromkeys(RES, 0)
        self.active = {}           # tid -> Run: the running tasks, measured (monitor.py)
        self.next_sample = 0.0     # when running tasks are next measured
        self.conn = None
        self.exit_requested = False
        self.proxy = None          # the local tunnel proxy (userlevel_net.proxy), when the manager offers one
        self.proxy_egress = None
        self.task_env = {}         # variables every task gets (the tunnel's proxy settings)
        self.ka = (5.0, 30.0)
        self.hostname = os.environ.get("SLURMD_NODENAME") or socket.gethostname()   # a Slurm node's name

    # ---------------------------------------------------------------- life
    def run(self) -> int:
        """Serve managers until told to exit or the manager is unreachable. Returns an exit code."""
        try:
            served = False
            while not self.exit_requested:
                sock = self._connect()
                if sock is None:
                    if self.refused:
                        log.info("the manager at %s:%d no longer listens: the run is over", *self.addr)
                        return 0
                    if served:
                        log.info("manager %s:%d is gone; exiting", *self.addr)
                        return 0
                    log.error("could not reach the manager at %s:%d within %.0f s: check the address and that "
                              "the manager is running", self.addr[0], self.addr[1], self.connect_timeout)
                    return 1
                try:
                    self._handshake(sock)
                except PermissionError as e:
                    log.error("%s", e)
                    return 2
                except (OSError, ProtocolError, Closed) as e:
                    log.warning("handshake with %s:%d failed: %s", self.addr[0], self.addr[1], e)
                    sock.close()
                    if not self.reconnect:
                        return 1
                    time.sleep(1.0)
                    continue
                served = True
                try:
                    self._serve()
                except SessionOver as e:
                    log.info("session over (%s); waiting for the next manager", e)
                except (ManagerGone, Closed, ProtocolError) as e:
                    log.warning("lost the manager: %s", e)
                finally:
                    self._end_session()
                if not self.reconnect:
                    break
            return 0
        finally:
            self.shutdown()

    def _connect(self):
        deadline = time.monotonic() + self.connect_timeout
        delay = 0.05
        while True:
            try:
                return socket.create_connection(self.addr, timeout=10)
            except ConnectionRefusedError:
                if self.exit_on_refused:
                    self.refused = True
                    return None
                if time.monotonic() + delay > deadline:
                    return None
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
            except OSError:
                if time.monotonic() + delay > deadline:
                    return None
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _handshake(self, sock):
        hs = handshake.Answerer(self.secret, handshake.WORKER)

        def step(data=b""):
            """Feed the handshake until it has a message for us."""
            while True:
                m = hs.receive_data(data)
                if m is not None:
                    return m
                data = sock.recv(65536)
                if not data:
                    raise Closed("manager closed the connection during the handshake (wrong secret?)")

        # a pilot's workers may connect before the script creates its Manager: wait for the hello
        sock.settimeout(max(15.0, self.connect_timeout))
        step()
        sock.settimeout(15)
        sock.sendall(hs.auth())
        try:
            welcome = step()
        except handshake.AuthFailed:
            raise PermissionError("the manager at %s:%d did not prove it knows the secret: refusing to run its tasks"
                                  % self.addr) from None
        self.wid = welcome.wid
        self._tunnel(welcome.tunnel)
        if welcome.keepalive:
            self.ka = (float(welcome.keepalive[0]), float(welcome.keepalive[1]))
        conn = Connection(sock, hs.rest)       # with whatever followed the welcome
        self.conn = conn
        info = dict(self.total, host=self.hostname, pid=os.getpid(), cached=sorted(self.cache.entries),
                    workdir=self.workdir, version=wire.VERSION)
        conn.send("info", info)
        self.sel.register(sock, selectors.EVENT_READ, ("manager", None))
        self._writing = False
        self.last_recv = self.last_send = time.monotonic()

    def _tunnel(self, info):
        """The manager offers a way out: start (or keep) our local proxy and give tasks its variables."""
        if not info:
            self.task_env = {}
            return
        egress = info.get("egress") or "%s:%d" % (self.addr[0], int(info["port"]))
        if self.proxy is None or self.proxy_egress != egress:
            if self.proxy is not None:
                self.proxy.stop()
            from userlevel_net.proxy import start_proxy   # only workers that tunnel need it
            self.proxy = start_proxy(egress, self.secret, no_proxy=[self.addr[0], self.hostname],
                                     log=os.path.join(self.workdir, "tunnel-proxy.log"))
            self.proxy_egress = egress
        self.task_env = dict(self.proxy.env)

    def _serve(self):
        conn = self.conn
        # messages that arrived with the welcome
        for m in conn.dec.feed(b""):
            self._message(*m)
        while not self.exit_requested:
            self._flush()
            self.guard.flush()
            timeout = self._next_timer()
            for key, ev in self.sel.select(timeout):
                what, obj = key.data
                if what == "manager":
                    if ev & selectors.EVENT_READ:
                        msgs = conn.read()
                        self.last_recv = time.monotonic()
                        for m in msgs:
                            self._message(*m)
                            if self.exit_requested:
                                return
                elif what == "proc":
                    self._proc_exited(obj)
                elif what == "out":
                    self._proc_output(obj)
                elif what == "runner":
                    for tid, payload in self.pool.readable(obj):
                        self._py_done(tid, payload, obj)
                elif what == "wake":
                    try:
                        self._wr.recv(4096)
                    except BlockingIOError:
                        pass
                    self._fetches_done()
            self._timers()

    def _flush(self):
        conn = self.conn
        if conn is None or conn.closed or not conn.out:
            return
        done = conn.flush()
        self.last_send = time.monotonic()
        if done == self._writing:        # interest in writability changes: tell epoll
            self._writing = not done
            self.sel.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE if self._writing
                            else selectors.EVENT_READ, ("manager", None))

    def _next_timer(self):
        now = time.monotonic()
        t = self.ka[0]
        for r in self.runs.values():
            if r.deadline is not None:
                t = min(t, r.deadline - now)
        m = self._monitor_due(now)
        if m is not None:
            t = min(t, m)
        return max(0.0, t)

    def _timers(self):
        now = time.monotonic()
        for r in list(self.runs.values()):
            if r.deadline is not None and now >= r.deadline and r.state == "running" and r.killed is None:
                # over its time allocation: resource exhaustion, naming the resource and by how much
                r.exhausted = {"resource": "time", "used": round(now - r.started, 1),
                               "allocated": float(r.spec["time_max"])}
                self._kill(r, "resource exhaustion", monitor.exhausted_reason(r.exhausted))
        self._sample(now)
        if now - self.last_recv > self.ka[1]:
            raise ManagerGone("no message from the manager for %.0f s" % (now - self.last_recv))
        if now - self.last_send > self.ka[0] and now - self.last_recv > self.ka[0]:
            self.conn.send("ping")

    def _end_session(self):
        for r in list(self.runs.values()):
            self._abort(r)
        self.runs.clear()
        self.queue.clear()
        self.presented.clear()
        self.used = dict.fromkeys(RES, 0)
        self.gpu_free = list(self.gpu_ids)
        self.active.clear()
        if self.conn is not None:
            try:
                self.sel.unregister(self.conn.sock)
            except (KeyError, ValueError):
                pass
            self.conn.close()
            self.conn = None
        self.cache.end_of_workflow()
        self.put_errors.clear()
        self.fns.clear()
        self.pool.forget_functions()

    def shutdown(self):
        self.pool.close()
        if self.proxy is not None:
            self.proxy.stop()
        self.guard.close()
        self.fetcher.shutdown(wait=False, cancel_futures=True)
        if self.own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # ---------------------------------------------------------------- messages from the manager
    def _message(self, name, ctl, frames):
        h = getattr(self, "_on_" + name, None)
        if h is None:
            raise ProtocolError("unexpected message %r from the manager" % name)
        try:
            h(ctl, frames)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ProtocolError("malformed %s message: %s: %s" % (name, type(e).__name__, e)) from None

    def _on_ping(self, ctl, frames):
        self.conn.send("pong")

    def _on_pong(self, ctl, frames):
        pass

    def _on_exit(self, ctl, frames):
        if ctl.get("final", True) or not self.reconnect:
            self.exit_requested = True
        else:
            raise SessionOver(ctl.get("reason") or "the manager closed")

    def _on_fn(self, ctl, frames):
        self.fns[ctl["fid"]] = frames[0]

    def _on_put(self, ctl, frames):
        n = ctl["cn"]
        if n in self.put_errors:
            return
        try:
            self.cache.put_chunk(n, frames[0] if frames else b"", bool(ctl.get("last")), ctl.get("kind", "file"),
                                 ctl.get("level", "workflow"), ctl.get("mode", 0o444))
        except OSError as e:   # disk full, quota: the tasks that need this file fail, the worker goes on
            self.put_errors[n] = "cannot store input %s on worker %s: %s" % (n, self.hostname, e)
            self.cache.abort_part(n)
            log.error("%s", self.put_errors[n])

    def _on_unlink(self, ctl, frames):
        self.cache.remove(ctl["cn"])

    def _on_get(self, ctl, frames):
        n = ctl["cn"]
        try:
            fh = open(self.cache.path(n), "rb")
        except (OSError, ValueError) as e:
            self.conn.send("error", {"cn": n, "reason": "cannot send %s: %s" % (n, e)})
            return
        self.conn.send_stream(file_chunks(fh, "file", {"cn": n}))

    def _on_kill(self, ctl, frames):
        r = self.runs.get(ctl.get("id"))
        if r is not None:
            self._abort(r)

    def _on_task(self, ctl, frames):
        r = Run(ctl, frames[0] if frames else None)
        if r.id in self.runs:
            raise ProtocolError("task %s sent twice" % r.id)
        self.runs[r.id] = r
        inputs = ctl.get("inputs", ())
        try:
            for n, remote, kind, level, url in inputs:
                check_cachename(n)
        except (ValueError, TypeError) as e:
            r.spec["inputs"] = []
            return self._finish(r, "input missing", "bad input description: %s" % e)
        for n, remote, kind, level, url in inputs:
            self.cache.ref(n)
        for n, remote, kind, level, url in inputs:
            if n in self.put_errors:
                return self._finish(r, "input missing", self.put_errors[n], worker_fault=True)
            if self.cache.has(n):
                self.cache.raise_level(n, level)
            elif kind == "url":
                self._in_background(("url", n), r, self.cache.fetch_url, n, url)
            else:
                return self._finish(r, "input missing", "input %r (%s) was never sent to this worker" % (remote, n))
            if kind == "image":
                r.image = n
                if n not in self.images:
                    from sysimage_tools.deploy import ensure_local   # only workers that run images need it
                    self._in_background(("image", n), r, ensure_local, self.cache.path(n), url)
        fid = ctl.get("fid")
        if fid is not None and fid not in self.fns:
            return self._finish(r, "failed", "function %s was never sent to this worker" % fid)
        if not r.waiting_for:
            self._enqueue(r)

    def _in_background(self, key, r, fn, *args):
        """Run fn(*args) on a helper thread (URL fetch, image unpack); r waits for it."""
        r.waiting_for.add(key)
        waiting = self.fetching.get(key)
        if waiting is not None:
            waiting.append(r)
            return
        self.fetching[key] = [r]
        self.fetcher.submit(fn, *args).add_done_callback(lambda f, key=key: self._background_done(key, f))

    def _background_done(self, key, fut):
        self.fetched.append((key, fut))       # (helper thread) hand over to the loop
        try:
            self._ww.send(b"x")
        except OSError:
            pass

    def _fetches_done(self):
        while self.fetched:
            key, fut = self.fetched.popleft()
            (what, n), err = key, fut.exception()
            runs = self.fetching.pop(key, [])
            if err is None and what == "url":
                self.cache.entries[n] = "workflow"
                self.conn.send("cached", {"cn": n})
            elif err is None:
                self.images[n] = fut.result()
            for r in runs:
                if self.runs.get(r.id) is not r:
                    continue
                if err is not None:
                    self._finish(r, "input missing", "cannot %s %s: %s" % (
                        "fetch" if what == "url" else "unpack the environment image", n, err))
                else:
                    r.waiting_for.discard(key)
                    if not r.waiting_for:
                        self._enqueue(r)


def main(address, secret, **kw) -> int:
    signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(SystemExit(143)))
    signal.signal(signal.SIGUSR1, lambda *a: None)   # a pilot's walltime warning is for the manager
    w = Worker(address, secret, **kw)
    return w.run()
