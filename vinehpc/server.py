"""The manager's I/O thread: one selectors loop that owns every socket.

It accepts and authenticates workers, feeds what arrives into the core (worker joined,
result, worker lost, timers) and carries out the commands the core returns.  User threads
talk to it only through `post()` (a queue plus a wake-up socket) and the done queue, so
time spent in user code between waits never idles the workers.
"""
from __future__ import annotations

import collections
import itertools
import logging
import os
import selectors
import socket
import tarfile
import threading
import time

from .comm import Closed, Connection, file_chunks
from .outputs import Sink, discard, install_output
from .protocol import ProtocolError, auth, wire

log = logging.getLogger("vinehpc.manager")
HANDSHAKE_TIMEOUT = 10.0


class Peer:
    __slots__ = ("conn", "wid", "nonce", "state", "since", "last_recv", "last_send", "parts", "fetch",
                 "out_errors", "writing")

    def __init__(self, conn, now):
        self.conn = conn
        self.wid = None
        self.nonce = auth.nonce()
        self.state = "hello"     # hello -> welcomed -> joined
        self.since = now
        self.last_recv = now
        self.last_send = now
        self.parts = {}          # (tid, remote) -> open file for an output being received
        self.fetch = {}          # cachename -> open file for a temp being fetched
        self.out_errors = {}     # tid -> why an output could not be written
        self.writing = False     # registered for EVENT_WRITE (the socket was full)


class Server:
    def __init__(self, core, *, host, port, secret, journal, staging, keepalive_interval, keepalive_timeout,
                 sock=None, final_exit=True, resume=None, release=False, tunnel=None):
        """`sock`: an already listening socket (a pilot keeps one for all its managers; it is
        not closed here).  `final_exit`: on stop, tell workers to exit (True) or to come back
        for the next manager of the same run (False)."""
        self.core = core
        self.secret = secret
        self.journal = journal
        self.staging = staging
        self.ka_interval = keepalive_interval
        self.ka_timeout = keepalive_timeout
        self.own_lsock = sock is None
        self.lsock = socket.create_server((host, port), backlog=512) if sock is None else sock
        self.lsock.setblocking(False)
        self.final_exit = final_exit
        self.resume = resume
        self.release = release      # only tell every worker that joins to exit (a pilot's end)
        self.tunnel = tunnel        # {"port": P} (an egress beside us) or {"egress": "host:port"} (a gateway)
        self.released = 0
        self.drained = False
        self.drain_deadline = None
        self.port = self.lsock.getsockname()[1]
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.lsock, selectors.EVENT_READ, "accept")
        self._wr, self._ww = socket.socketpair()
        self._wr.setblocking(False)
        self.sel.register(self._wr, selectors.EVENT_READ, "wake")
        self._woken = False
        self.inbox = collections.deque()
        self.peers = {}           # wid -> Peer (joined)
        self.all = set()          # every Peer, joined or not
        self.dirty = set()
        self.done = collections.deque()
        self.cond = threading.Condition()
        self.wids = itertools.count(1)
        self.tars = {}            # dir cachename -> tar path in staging
        self.stopping = False
        self.stopped = threading.Event()
        self.error = None
        self.cpu = 0.0
        self.thread = threading.Thread(target=self._run, name="vinehpc-manager-io", daemon=True)

    # ---------------------------------------------------------------- user side
    def start(self):
        self.thread.start()

    def post(self, *op):
        self.inbox.append(op)
        if not self._woken:
            self._woken = True
            try:
                self._ww.send(b"x")
            except OSError:
                pass

    # ---------------------------------------------------------------- loop
    def _run(self):
        t0 = time.thread_time()
        try:
            next_timer = time.monotonic() + 1.0
            while True:
                timeout = max(0.0, next_timer - time.monotonic())
                for key, ev in self.sel.select(timeout):
                    what = key.data
                    if what == "accept":
                        self._accept()
                    elif what == "wake":
                        try:
                            self._wr.recv(4096)
                        except BlockingIOError:
                            pass
                    else:
                        if ev & selectors.EVENT_READ:
                            self._readable(what)
                        if ev & selectors.EVENT_WRITE and not what.conn.closed:
                            self.dirty.add(what)
                self._woken = False
                now = time.monotonic()
                while self.inbox:
                    self._op(self.inbox.popleft(), now)
                if now >= next_timer:
                    self._timers(now)
                    next_timer = now + 1.0
                if self.drain_deadline is not None and not self.drained:
                    self._check_drain(now)
                self.core.schedule(now)
                self._run_cmds()
                self._flush()
                if self.resume is not None:
                    self.resume.flush()     # results before the journal records that point at them
                self.journal.flush()
                if self.stopping and not any(p.conn.wants_write() for p in self.all):
                    break
        except BaseException as e:   # the I/O thread must never die silently
            self.error = e
            log.exception("vinehpc manager I/O thread crashed")
            with self.cond:
                self.cond.notify_all()
        finally:
            self.cpu = time.thread_time() - t0
            for p in list(self.all):
                p.conn.close()
            self.sel.close()
            if self.own_lsock:
                self.lsock.close()
            for s in (self._wr, self._ww):
                s.close()
            self.journal.flush()
            self.stopped.set()

    def _check_drain(self, now):
        if self.core.n_running and now < self.drain_deadline:
            return
        left = [t for t in self.core.tasks.values() if t.state == "running"]
        for t in left:
            self.core.cut(t.id, now, reason="cut by the walltime: still running when the %g s grace ended"
                          % self.drain_grace)
        self._run_cmds()
        self.journal.write({"event": "drained", "cut": [t.id for t in left],
                            "not run": len(self.core.tasks)})
        self.drained = True
        with self.cond:
            self.cond.notify_all()

    def _op(self, op, now):
        kind = op[0]
        if kind == "submit":
            self.core.submit(op[1], now)
        elif kind == "resumed":
            self.core.submit_resumed(op[1], now)
        elif kind == "drain":
            if self.drain_deadline is None:
                self.core.draining = True
                self.drain_grace = op[1]
                self.drain_deadline = now + op[1]
                self.journal.write({"event": "draining", "grace": op[1], "running": self.core.n_running,
                                    "waiting": len(self.core.tasks) - self.core.n_running})
        elif kind == "cancel":
            self.core.cancel(op[1], now)
        elif kind == "call":
            fn, box, ev = op[1], op[2], op[3]
            try:
                box.append(fn())
            finally:
                ev.set()
        elif kind == "stop":
            self.stopping = True
            for p in list(self.peers.values()):
                p.conn.send("exit", {"reason": op[1], "final": self.final_exit})
                self.dirty.add(p)
            self._stop_deadline = now + 5.0

    # ---------------------------------------------------------------- connections
    def _accept(self):
        while True:
            try:
                sock, addr = self.lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("accept failed: %s", e)
                return
            now = time.monotonic()
            p = Peer(Connection(sock), now)
            self.all.add(p)
            self.sel.register(sock, selectors.EVENT_READ, p)
            p.conn.send("hello", {"v": wire.VERSION, "nonce": p.nonce, "role": "manager"})
            self.dirty.add(p)

    def _drop(self, p, reason):
        if p not in self.all:
            return
        self.all.discard(p)
        self.dirty.discard(p)
        try:
            self.sel.unregister(p.conn.sock)
        except (KeyError, ValueError):
            pass
        p.conn.close()
        for f in list(p.parts.values()) + list(p.fetch.values()):
            discard(f)
        for n in p.fetch:
            self.core.fetch_failed(n)
        if p.wid is not None and self.peers.get(p.wid) is p:
            del self.peers[p.wid]
            self.core.worker_lost(p.wid, reason, time.monotonic())
        elif p.state != "released":
            self.journal.write({"event": "connection closed", "peer": p.conn.peer, "reason": reason})
            log.warning("closed connection from %s: %s", p.conn.peer, reason)

    def _readable(self, p):
        try:
            msgs = p.conn.read()
            now = time.monotonic()
            p.last_recv = now
            while msgs:
                for name, ctl, frames in msgs:
                    self._message(p, name, ctl, frames, now)
                    if p.conn.closed:
                        return
                # the decoder stops after a handshake message: continue with post-auth limits
                msgs = p.conn.dec.feed(b"") if p.conn.dec.buf else []
        except Closed as e:
            self._drop(p, str(e))
        except ProtocolError as e:
            self._drop(p, "protocol error: %s" % e)

    def _message(self, p, name, ctl, frames, now):
        if p.state != "joined":
            return self._handshake(p, name, ctl, now)
        h = getattr(self, "_on_" + name, None)
        if h is None:
            raise ProtocolError("unexpected message %r from a worker" % name)
        h(p, ctl, frames, now)

    def _handshake(self, p, name, ctl, now):
        if p.state == "hello" and name == "auth":
            theirs = ctl.get("nonce")
            if not isinstance(theirs, str) or len(theirs) > 256 or not auth.check(self.secret, "worker", p.nonce, theirs, ctl.get("mac")):
                self.journal.write({"event": "rejected", "peer": p.conn.peer, "reason": "wrong secret"})
                return self._drop(p, "authentication failed (wrong secret)")
            p.wid = next(self.wids)
            welcome = {"mac": auth.mac(self.secret, "manager", theirs, p.nonce), "wid": p.wid,
                       "keepalive": [self.ka_interval, self.ka_timeout]}
            if self.tunnel:
                welcome["tunnel"] = self.tunnel
            p.conn.send("welcome", welcome)
            p.conn.authenticated()
            p.state = "welcomed"
            self.dirty.add(p)
        elif p.state == "welcomed" and name == "info" and self.release:
            p.conn.send("exit", {"reason": "the run is over", "final": True})
            p.state = "released"
            self.released += 1
            self.dirty.add(p)
            with self.cond:
                self.cond.notify_all()
        elif p.state == "welcomed" and name == "info":
            p.state = "joined"
            self.peers[p.wid] = p
            ctl.setdefault("host", p.conn.peer.rsplit(":", 1)[0])
            ctl["addr"] = p.conn.peer
            self.core.worker_joined(p.wid, ctl, now)
        else:
            raise ProtocolError("expected the handshake, got %r" % name)

    # ---------------------------------------------------------------- messages from workers
    def _on_pong(self, p, ctl, frames, now):
        pass

    def _on_ping(self, p, ctl, frames, now):
        p.conn.send("pong")
        self.dirty.add(p)

    def _on_cached(self, p, ctl, frames, now):
        self.core.file_cached(p.wid, str(ctl.get("cn")), ctl.get("size", 0))

    def _on_error(self, p, ctl, frames, now):
        self.journal.write({"event": "worker error", "worker": p.wid, "reason": ctl.get("reason")})
        if ctl.get("cn"):
            self.core.fetch_failed(ctl["cn"])

    def _on_result(self, p, ctl, frames, now):
        tid = ctl.get("id")
        task = self.core.tasks.get(tid)
        if task is not None and task._wid == p.wid:
            task._result = frames[0] if frames else None
            err = p.out_errors.pop(tid, None)
            if err and ctl.get("status") == "success":
                ctl["status"], ctl["reason"] = "output missing", err
        self.core.task_done(p.wid, tid, ctl, now)

    def _on_outfile(self, p, ctl, frames, now):
        tid, remote = ctl.get("id"), ctl.get("remote")
        task = self.core.tasks.get(tid)
        key = (tid, remote)
        f = p.parts.get(key)
        if f is None:
            if task is None or task._wid != p.wid:
                return   # stale: its task went elsewhere
            dest = next((fl for fl, r in task.outputs if r == remote and fl.kind == "file"), None)
            if dest is None:
                raise ProtocolError("output %r is not an output of task %s" % (remote, tid))
            if ctl.get("last") and not ctl.get("tar") and len(frames) == 1:
                # the whole file in one chunk: one write in place, no temporary file and rename
                try:
                    with open(dest.source, "wb") as out:
                        out.write(frames[0])
                except OSError as e:
                    p.out_errors[tid] = "cannot write output %r: %s" % (dest.source, e)
                dest.invalidate()
                return
            part = "%s.vinehpc-part-%s" % (dest.source, tid)
            try:
                d = os.path.dirname(os.path.abspath(dest.source))
                os.makedirs(d, exist_ok=True)
                f = p.parts[key] = open(part, "wb")
            except OSError as e:
                p.out_errors[tid] = "cannot write output %r: %s" % (dest.source, e)
                p.parts[key] = f = Sink(dest)
            f.dest = dest
            f.is_tar = bool(ctl.get("tar"))
        for b in frames:
            f.write(b)
        if ctl.get("last"):
            del p.parts[key]
            f.close()
            if not isinstance(f, Sink):
                try:
                    install_output(f.name, f.dest.source, f.is_tar)
                except (OSError, tarfile.TarError) as e:
                    p.out_errors[tid] = "cannot write output %r: %s" % (f.dest.source, e)
                f.dest.invalidate()

    def _on_file(self, p, ctl, frames, now):
        n = str(ctl.get("cn"))
        f = p.fetch.get(n)
        if f is None:
            path = os.path.join(self.staging, n)
            f = p.fetch[n] = open(path + ".part", "wb")
        for b in frames:
            f.write(b)
        if ctl.get("last"):
            del p.fetch[n]
            f.close()
            path = os.path.join(self.staging, n)
            os.replace(path + ".part", path)
            self.core.file_fetched(n, path)

    # ---------------------------------------------------------------- commands from the core
    def _run_cmds(self):
        cmds = self.core.cmds
        if not cmds:
            return
        self.core.cmds = []
        done = []
        for c in cmds:
            kind = c[0]
            if kind == "log":
                self.journal.write(c[1])
            elif kind == "done":
                t = c[1]
                cb = getattr(t, "_on_done", None)
                if cb is not None:
                    cb(t)
                else:
                    done.append(t)
                if self.resume is not None and t.result == "success" and not t.resumed:
                    self.journal.write(self.resume.record(t))
            else:
                p = self.peers.get(c[1])
                if p is None:
                    continue
                try:
                    getattr(self, "_cmd_" + kind)(p, *c[2:])
                except Exception as e:   # one bad file or task must not stop the manager
                    self._cmd_failed(p, c, e)
                    continue
                self.dirty.add(p)
        if done:
            with self.cond:
                self.done.extend(done)
                self.cond.notify_all()

    def _cmd_failed(self, p, c, e):
        kind = c[0]
        why = "%s: %s" % (type(e).__name__, e)
        self.journal.write({"event": "error", "worker": p.wid, "command": kind, "reason": why})
        if kind == "put":
            # the file could not be read: the worker will not have it
            self.core.put_failed(p.wid, c[3])
        elif kind == "task":
            task = c[2]
            self.core.task_done(p.wid, task.id, {"status": "failed", "reason": "could not send the task: " + why},
                                time.monotonic())
        if not isinstance(e, OSError):
            log.error("manager could not carry out %s for worker %s: %s", kind, p.wid, why)

    def _cmd_fn(self, p, fid, data):
        p.conn.send("fn", {"fid": fid}, [data])

    def _cmd_put(self, p, f, n):
        if f.kind == "buffer":
            p.conn.send("put", {"cn": n, "off": 0, "last": True, "kind": "file", "size": len(f.data),
                                "level": f.cache}, [f.data])
            return
        if f.kind == "temp":
            path, kind = self.core.manager_copy[n], "file"
        elif f.is_dir():
            path, kind = self._tar(f, n), "tar"
        else:
            path, kind = f.source, "file"
        fh = open(path, "rb")
        p.conn.send_stream(file_chunks(fh, "put", {"cn": n, "kind": kind, "level": f.cache,
                                                   "mode": os.fstat(fh.fileno()).st_mode & 0o777}))

    def _tar(self, f, n):
        path = self.tars.get(n)
        if path is None:
            path = os.path.join(self.staging, n + ".tar")
            with tarfile.open(path + ".part", "w") as tar:
                tar.add(f.source, arcname=".")
            os.replace(path + ".part", path)
            self.tars[n] = path
        return path

    def _cmd_task(self, p, task):
        spec = task._spec()
        spec["id"] = task.id
        spec["inputs"] = [[n, remote, "image" if f.image else f.kind, f.cache,
                           f.source if f.kind == "url" else f.image]
                          for (f, remote), (n, _, _) in zip(task.inputs, task._input_names)]
        spec["outputs"] = [[remote, f.kind, f.cachename() if f.kind == "temp" else None] for f, remote in task.outputs]
        if task.env:
            spec["env"] = task.env
        spec["res"] = task._res
        if task.time_max:
            spec["time_max"] = task.time_max
        spec["category"] = task.category
        if self.core.short(task.category):
            spec["pipe"] = True
        p.conn.send("task", spec, [task._abytes] if task._abytes is not None else ())

    def _cmd_kill(self, p, tid):
        p.conn.send("kill", {"id": tid})

    def _cmd_get(self, p, n):
        p.conn.send("get", {"cn": n})

    # ---------------------------------------------------------------- writing, timers
    def _flush(self):
        dirty, self.dirty = self.dirty, set()
        now = None
        for p in dirty:
            conn = p.conn
            if conn.closed or not conn.out:
                continue
            try:
                complete = conn.flush()
            except Closed as e:
                self._drop(p, str(e))
                continue
            if now is None:
                now = time.monotonic()
            p.last_send = now
            if complete == p.writing:      # interest in writability changes: tell epoll
                p.writing = not complete
                try:
                    self.sel.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE if p.writing
                                    else selectors.EVENT_READ, p)
                except (KeyError, ValueError):
                    pass

    def _timers(self, now):
        self.core.tick(now)
        for p in list(self.all):
            if p.state != "joined":
                if now - p.since > HANDSHAKE_TIMEOUT:
                    self._drop(p, "no handshake within %.0f s" % HANDSHAKE_TIMEOUT)
                continue
            if now - p.last_recv > self.ka_timeout:
                self._drop(p, "no message for %.0f s (keepalive timeout)" % (now - p.last_recv))
            elif now - p.last_recv > self.ka_interval and now - p.last_send > self.ka_interval / 2:
                p.conn.send("ping")
                self.dirty.add(p)
        if self.stopping and now > getattr(self, "_stop_deadline", now):
            for p in list(self.all):
                self._drop(p, "manager stopped")
