"""The manager's I/O thread: one selectors loop that owns every socket.

It accepts and authenticates workers, turns what arrives into core events (worker joined,
result, worker lost, timers), and carries out the commands the core returns: sockets,
files and timers only, every decision is the core's.  User threads talk to it only through
`post()` (a queue plus a wake-up socket) and the done queue, so time spent in user code
between waits never idles the workers.
"""
from __future__ import annotations

import collections
import itertools
import json
import logging
import os
import selectors
import secrets
import socket
import stat
import sys
import tarfile
import threading
import time

from .admission import MAX_UNAUTHENTICATED, Admission
from .comm import Closed, Connection, file_chunks, unix_address
from .comm.peer import PUT_PIECE
from .comm.receive import Incoming
from .core import commands as cmd
from .core.placement import STARTS_PER_WORKER
from .core.workers import NONE, added
from .core.events import (TICK, FetchFailed, FileCached, FileDropped, FileFetched, FileResolved, PutFailed,
                          Schedule, TaskResult, TasksStarted, TransferDone, WorkerJoined, WorkerLost)
from .protocol import ProtocolError, handshake, messages, tls
from .status import Tracker
from .protocol.names import check_cachename
from .protocol.wire import CHUNK

log = logging.getLogger("vinehpc.manager")
HANDSHAKE_TIMEOUT = 10.0
# connections waiting for accept(): a pilot's ranks all connect in the same second, and those
# beyond the backlog are dropped by the kernel and retried by their SYN timer (1 s, 3 s, 7 s...).
# The kernel caps it at net.core.somaxconn.
BACKLOG = 4096
# user requests (submits...) taken per loop turn: a script submitting a million tasks must not keep
# the thread from its sockets (keepalives, results) and its journal for the whole burst.  At least
# as many as a scheduling pass may start (STARTS_PER_WORKER a worker): fewer ready tasks than
# workers give each worker one task a turn, a message each way per task (issue 15)
INBOX_TURN = 4096
STATUS_IDLE = 60.0          # a status client that asks nothing for this long is closed
# a scheduling pass goes in parts of this many starts, each part's commands carried out before the
# next (see core/placement.schedule: a pass starting thousands held all their commands at once)
SCHEDULE = Schedule(part=256)


class Peer:
    __slots__ = ("conn", "wid", "hs", "state", "since", "last_recv", "last_send", "parts", "fetch",
                 "out_errors", "writing", "shut", "wanted", "unasked")

    def __init__(self, conn, now, hs):
        self.conn = conn
        self.wid = None
        self.hs = hs             # the handshake (handshake.Greeter) until the worker is authenticated
        self.state = "hello"     # [tls ->] hello -> welcomed -> joined; or hello -> status (`vinehpc status`)
        self.since = now
        self.last_recv = now
        self.last_send = now
        self.parts = {}          # (tid, remote) -> comm.receive.Incoming: an output being received
        self.fetch = {}          # cachename -> comm.receive.Incoming: a temp being fetched
        self.out_errors = {}     # tid -> [why each output that could not be written was not]
        self.writing = False     # registered for EVENT_WRITE (the socket was full)
        self.shut = False        # stopping: our side half-closed, waiting for the worker to close its own
        # cachenames asked of this worker (GetFile) whose bytes have not begun; a set at the first
        # (workers.NONE until then: an empty set is one more object a worker for the collector)
        self.wanted = NONE
        self.unasked = 0         # `file` messages dropped because nobody asked for them (logged a few times)


def _output_error(p, tid, path, e):
    """Keep why output `path` of task `tid` could not be written (every output's, not the last)."""
    p.out_errors.setdefault(tid, []).append("%s (%s)" % (path, getattr(e, "strerror", None) or e))


def _unix_listener(path):
    """A listening Unix socket for the workers on this machine -> (socket, its address), or
    (None, None) when there cannot be one.  At `path` (mode 0600, replacing a socket left there
    by a manager that was killed) when it fits in a Unix socket's address; else, on Linux, in the
    abstract namespace ("@vinehpc-PID-RANDOM": no file, gone with the socket; any local user can
    connect, as to the loopback, and meets the same handshake)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if len(os.fsencode(path)) < 104:         # sun_path: 108 bytes on Linux, 104 on the BSDs
            try:
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)
            except FileNotFoundError:
                pass
            s.bind(path)
            os.chmod(path, 0o600)
            where = path
        elif sys.platform.startswith("linux"):
            where = "@vinehpc-%d-%s" % (os.getpid(), secrets.token_hex(8))
            s.bind(unix_address(where))
        else:
            raise OSError("%s is too long a path for a Unix socket" % path)
        s.listen(BACKLOG)
    except OSError as e:
        s.close()
        log.info("no Unix socket for local workers at %s (%s); they use TCP", path, e)
        return None, None
    return s, where


class Server:
    def __init__(self, core, *, host, port, secret, journal, staging, keepalive_interval, keepalive_timeout,
                 sock=None, own_sock=False, final_exit=True, resume=None, release=False, tunnel=None, also=None,
                 tls=None, unix=None):
        """`sock`: an already listening socket (a pilot keeps one for all its managers; it is
        not closed here unless `own_sock`).  `also`: one more listening socket, owned and
        closed here (the port a TaskVine-style `Manager(9123)` asked for under a run, beside
        the run's own socket).
        `final_exit`: on stop, tell workers to exit (True) or to come back for the next manager
        of the same run (False).  `tls`: a protocol.tls.ServerTLS: every connection is announced
        TLS and runs the TLS handshake before the run's own (Manager(ssl=...)).
        `unix`: a path for one more listening socket, a Unix one, for the workers on this machine
        (a local run's): each hop through it is about 8 us shorter than over loopback TCP.  None
        with TLS (local workers then use TLS over TCP); for too long a path, one in Linux's
        abstract namespace.  `unix_path` is where it is ("@NAME": abstract; None: TCP only)."""
        self.core = core
        self.tls = tls
        self.secret = secret
        self.journal = journal
        self.staging = staging
        self.ka_interval = keepalive_interval
        self.ka_timeout = keepalive_timeout
        self.own_lsock = sock is None or own_sock
        self.lsock = socket.create_server((host, port), backlog=BACKLOG) if sock is None else sock
        self.lsock.setblocking(False)
        self.final_exit = final_exit
        self.resume = resume
        self.release = release      # only tell every worker that joins to exit (a pilot's end)
        self.tunnel = tunnel        # {"port": P} (an egress beside us) or {"egress": "host:port"} (a gateway)
        self.released = 0
        self.drained = False      # the core ended a drain: nothing more will run
        self.n_workers = 0        # joined workers (published for Manager.wait_for_workers, under cond)
        self.sent = {}            # tid -> (wid, outputs, att) of the attempt in flight: where its outputs go
        self.port = self.lsock.getsockname()[1]
        self.sel = selectors.DefaultSelector()
        self.also = also
        self.unix_sock, self.unix_path = _unix_listener(unix) if unix is not None and tls is None else (None, None)
        self.listening = [self.lsock] + [s for s in (also, self.unix_sock) if s is not None]
        self.accepting = False        # the listening sockets are in the selector
        for ls in self.listening:
            ls.setblocking(False)
        self._listen(True)
        self.admission = Admission()   # caps on strangers and connections, pauses, rate-limited logging
        self._wr, self._ww = socket.socketpair()
        self._wr.setblocking(False)
        self.sel.register(self._wr, selectors.EVENT_READ, "wake")
        self._woken = False
        self.inbox = collections.deque()
        self.peers = {}           # wid -> Peer (joined)
        self.all = set()          # every Peer, joined or not
        self.dirty = set()
        self.done = collections.deque()
        self._returned = []       # tasks handed back during this loop turn (one notify for all)
        self.cond = threading.Condition()
        self.wids = itertools.count(1)
        self.tars = {}            # dir cachename -> tar path in staging
        self.stopping = False
        self.stopped = threading.Event()
        self.error = None
        self.cpu = 0.0
        # the run's figures, from the journal records as they are written (vinehpc/status.py);
        # published for other threads: `stats` (m.stats) whenever a record moved them, `snapshot`
        # (the metrics endpoint) once a second -- read without calling into this thread
        self.status = Tracker()
        self.bytes_received = 0
        self._published = self.status.published()
        self.snapshot = None
        self.want_snapshot = False    # set when a metrics endpoint reads `snapshot`
        self._stats_version = 0
        self.thread = threading.Thread(target=self._run, name="vinehpc-manager-io", daemon=True)

    # ---------------------------------------------------------------- user side
    def start(self):
        self.thread.start()

    def post(self, op):
        """`op`: a core event, or ("call", fn, box, done_event) / ("stop", reason) for this thread."""
        self.inbox.append(op)
        if not self._woken:
            self._woken = True
            try:
                self._ww.send(b"x")
            except OSError:
                pass

    def stop(self, reason):
        """Tell the workers to exit (or come back, see final_exit) and end the loop."""
        self.post(("stop", reason))

    # ---------------------------------------------------------------- loop
    def _run(self):
        t0 = time.thread_time()
        try:
            next_timer = time.monotonic() + 1.0
            while True:
                timeout = 0.0 if self.inbox else max(0.0, next_timer - time.monotonic())
                listening = ()
                for key, ev in self.sel.select(timeout):
                    what = key.data
                    if what == "accept":
                        listening += (key.fileobj,)
                    elif what == "wake":
                        try:
                            self._wr.recv(4096)
                        except BlockingIOError:
                            pass
                    else:
                        if what.state == "tls":
                            self._tls_step(what)        # a handshake step waits on either direction
                            continue
                        if ev & selectors.EVENT_READ:
                            self._readable(what)
                        if ev & selectors.EVENT_WRITE and not what.conn.closed:
                            self.dirty.add(what)
                # accepted after the reads: the answers of connections in their handshake are read
                # first, so after a long turn (a pass starting thousands of tasks) admission does not
                # take workers whose answer waits in the socket for strangers that never answer
                for ls in listening:
                    self._accept(ls)
                self._woken = False
                now = time.monotonic()
                for _ in range(min(len(self.inbox), max(INBOX_TURN, STARTS_PER_WORKER * len(self.peers)))):
                    self._op(self.inbox.popleft(), now)
                if now >= next_timer:
                    self._timers(now)
                    next_timer = now + 1.0
                self._feed(SCHEDULE, now)
                while self.core.pass_left is not None:
                    self._feed(SCHEDULE, now)
                self._flush()           # the turn's messages first: publishing is not on a task's way
                if self.status.version != self._stats_version:
                    self.publish_stats()     # before the hand-over: wait() never returns ahead of m.stats
                if self.resume is not None:
                    self.resume.flush()     # results before the journal records that point at them
                self.journal.flush()
                if self.n_workers != len(self.peers):
                    self._publish_workers()     # after the flush: a waiter finds the join in the journal
                # last, just before select() lets go of the GIL: the user's thread, woken here, runs
                # at once instead of waiting for this turn's writes (each a GIL hand-over and back),
                # and what wait() returns is already in the journal
                self._hand_over()
                if self.stopping and not any(p.conn.wants_write() for p in self.all) and not self._half_close():
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
            if self.also is not None:
                self.also.close()
            if self.unix_sock is not None:
                self.unix_sock.close()
                if not self.unix_path.startswith("@"):
                    try:
                        os.unlink(self.unix_path)
                    except OSError:
                        pass
            for s in (self._wr, self._ww):
                s.close()
            self.journal.flush()
            self.stopped.set()

    def _op(self, op, now):
        if type(op) is not tuple:
            return self._feed(op, now)
        kind = op[0]
        if kind == "call":
            fn, box, ev = op[1], op[2], op[3]
            try:
                box.append(fn())
            finally:
                ev.set()
        elif kind == "stop":
            self.record({"event": "stopping", "reason": op[1]})    # workers leaving from now on were told to
            self.stopping = True
            for p in list(self.all):
                if p.hs is None:        # joined, or welcomed and its info not read yet: both are told
                    p.conn.send("exit", {"reason": op[1], "final": self.final_exit})
                self.dirty.add(p)
            self._stop_deadline = now + 5.0

    def _feed(self, event, now):
        cmds = self.core.handle(event, now)
        if cmds:
            self._carry(cmds)

    def record(self, rec):
        """Write a journal record; the figures follow it (this thread, or before/after it runs)."""
        self.status.feed(rec, self.journal.write(rec))

    def publish_stats(self):
        """Publish the counts for m.stats (this thread; or the user's while this one is not
        running): one dict copy per loop turn that moved them; readers derive the rest."""
        self._stats_version = self.status.version
        self._published = self.status.published()

    @property
    def stats(self):
        """The figures as last published (any thread: reads, never calls into this one)."""
        return self.status.counts(time.time(), {"bytes_received": self.bytes_received}, self._published)

    def status_snapshot(self) -> dict:
        """Everything `vinehpc status` shows, built now (on this thread): O(workers), not O(tasks)."""
        incoming = outgoing = 0
        for p in self.peers.values():
            incoming += len(p.parts) + len(p.fetch)
            outgoing += p.conn.transfers()
        snap = self.status.snapshot(time.time(), {"bytes_received": self.bytes_received})
        snap["transfers"] = {"incoming": incoming, "outgoing": outgoing}
        snap["status_clients"] = sum(1 for p in self.all if p.state == "status")
        snap["source"] = "manager"
        return snap

    def _publish_workers(self):
        with self.cond:
            self.n_workers = len(self.peers)
            self.cond.notify_all()

    # ---------------------------------------------------------------- connections
    def _accept(self, lsock):
        while True:
            now = time.monotonic()
            if not self.admission.room(len(self.all)):
                return self._pause_accept(now, "%d connections, the most that leaves descriptors for outputs"
                                          % len(self.all))
            if not self.admission.handshake_room(now):
                return self._listen(False)      # the rest wait in the backlog (_handshake, _timers: again)
            try:
                sock, addr = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:     # out of descriptors (EMFILE, ENFILE) or memory: never spin on it
                return self._pause_accept(now, "accept failed: %s" % e)
            if self.tls is not None:
                try:
                    sock.setblocking(False)
                    # the announcement in plaintext (tls.py); 40 bytes into a fresh socket's buffer
                    if sock.send(tls.ANNOUNCE) != len(tls.ANNOUNCE):
                        raise OSError("could not send the TLS announcement")
                    sock = self.tls.wrap(sock)
                except OSError as e:
                    log.info("connection from %s closed at once: %s", addr, e)
                    sock.close()
                    continue
            p = Peer(Connection(sock), now, handshake.Greeter(self.secret, handshake.WORKER, handshake.STATUS))
            self.all.add(p)
            self.sel.register(sock, selectors.EVENT_READ, p)
            if self.tls is not None:
                p.state = "tls"         # the hello goes once the peer's TLS handshake is done (_tls_step)
            else:
                p.conn.send_bytes(p.hs.hello())
                self.dirty.add(p)
            oldest = self.admission.arrived(p, now)
            if oldest is not None:
                self._drop(oldest, "no handshake before %d newer connections came" % MAX_UNAUTHENTICATED)

    def _pause_accept(self, now, why):
        """Leave the listening sockets out of the selector for a moment (_timers puts them back)."""
        self._listen(False)
        self.admission.pause(now)
        if self.admission.should_log(why, now):
            log.warning("not accepting connections for a moment: %s", why)

    def _listen(self, on):
        """Put the listening sockets in the selector, or take them out (accept() held or paused)."""
        if on != self.accepting:
            self.accepting = on
            for ls in self.listening:
                if on:
                    self.sel.register(ls, selectors.EVENT_READ, "accept")
                else:
                    self.sel.unregister(ls)

    def _handshake_ended(self):
        """A connection left its handshake: a connection held in the backlog may start its own."""
        if not self.accepting and self.admission.held and self.admission.may_listen(time.monotonic()):
            self._listen(True)

    def _drop(self, p, reason, rejected=False, refused=False):
        """Close and forget peer p; `refused`: for breaking the protocol (said even of a status
        client or a released worker, whose ordinary leaving is no news)."""
        if p not in self.all:
            return
        self._forget_quietly(p)
        now = time.monotonic()
        for n in list(p.fetch) + list(p.wanted):     # asked of it, will not come
            self._feed(FetchFailed(n), now)
        if p.wid is not None and self.peers.get(p.wid) is p:
            del self.peers[p.wid]
            self._feed(WorkerLost(p.wid, reason), now)
        elif (refused or p.state not in ("released", "status")) and self.admission.should_log(reason, now):
            if rejected:                  # (beyond the rate: counted, summed up in _timers)
                self.record({"event": "rejected", "peer": p.conn.peer, "reason": "wrong secret"})
            self.record({"event": "connection closed", "peer": p.conn.peer, "reason": reason})
            log.warning("closed connection from %s: %s", p.conn.peer, reason)

    def _half_close(self) -> bool:
        """Stopping, the exits sent: end our side of each connection and wait for the worker to close
        its own (it does on reading the exit). Closing outright while a worker's last message is still
        unread would reset the connection, and the worker would report a normal end as a lost manager.
        True while some worker has not closed yet (the stop deadline drops it)."""
        for p in list(self.all):
            if p.hs is not None:          # still authenticating: nothing to tell it
                self._forget_quietly(p)
            elif not p.shut:
                p.shut = True
                try:
                    p.conn.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    self._forget_quietly(p)
        return bool(self.all)

    def _forget_quietly(self, p):
        """Close a connection and forget it, and nothing more (_drop also tells the core; a
        connection that ends while the manager stops needs no worker lost, nothing requeued)."""
        self.admission.gone(p)
        self._handshake_ended()
        self.all.discard(p)
        self.dirty.discard(p)
        try:
            self.sel.unregister(p.conn.sock)
        except (KeyError, ValueError):
            pass
        p.conn.close()
        for f in list(p.parts.values()) + list(p.fetch.values()):
            f.abort()           # a file that was arriving (comm.receive.Incoming): nothing of it stays

    def _tls_step(self, p):
        """Drive a new connection's TLS handshake (non-blocking); once done, greet it as any."""
        try:
            wait = tls.handshake_step(p.conn.sock)
        except tls.TLSError as e:
            return self._drop(p, str(e))
        if wait is None:
            p.state = "hello"
            p.conn.send_bytes(p.hs.hello())
            self.dirty.add(p)
        writing = wait == "write"
        if writing != p.writing:
            p.writing = writing
            self.sel.modify(p.conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE if writing
                            else selectors.EVENT_READ, p)

    def _readable(self, p):
        if p.shut:                        # stopping: what comes now is unread; EOF means the worker left
            try:
                p.conn.recv()
            except Closed:
                self._forget_quietly(p)
            return
        try:
            if p.hs is not None:
                msgs = self._handshake(p, p.conn.recv())
            else:
                msgs = p.conn.typed()
            now = time.monotonic()
            p.last_recv = now
            for msg, ctl in msgs:       # (each validated as it comes: a batch whole, before its first)
                self._message(p, msg, ctl, now)
                if p.conn.closed:
                    return
        except Closed as e:
            self._drop(p, str(e))
        except ProtocolError as e:
            self._drop(p, "protocol error: %s" % e, refused=True)

    def _message(self, p, msg, ctl, now):
        """Every message after the handshake is decoded and validated (protocol/messages.py) before
        anything acts on it: a peer that sends an invalid one is dropped (ProtocolError), the run
        goes on.  Handlers get the typed message, and its control dict (validated) for the ones
        that hand it on whole."""
        name = msg.NAME
        if p.state == "status":
            if type(msg) is not messages.Status:
                raise ProtocolError("a status client sent %r" % name)
            data = json.dumps(self.status_snapshot(), separators=(",", ":"), default=str).encode()
            p.conn.send_msg(messages.Snapshot(data=data))
            self.dirty.add(p)
            return
        if p.state != "joined":
            return self._join(p, msg, ctl, now)
        h = self._handlers.get(type(msg))
        if h is None:
            raise ProtocolError("unexpected message %r from a worker" % name)
        h(self, p, msg, ctl, now)

    def _handshake(self, p, data):
        """Bytes from a peer not yet authenticated; returns the messages that came behind its auth."""
        try:
            if p.hs.receive_data(data) is None:
                return []
        except handshake.AuthFailed as e:
            self._drop(p, str(e), rejected=True)
            return []
        self.admission.authenticated(p, time.monotonic())
        self._handshake_ended()
        if p.hs.roles is handshake.STATUS:
            p.conn.send_bytes(p.hs.welcome())
            p.state = "status"
            self.dirty.add(p)
            rest, p.hs = p.hs.rest, None
            return p.conn.typed(rest)
        p.wid = next(self.wids)
        p.conn.send_bytes(p.hs.welcome(wid=p.wid, keepalive=[self.ka_interval, self.ka_timeout],
                                       tunnel=self.tunnel or None))
        p.state = "welcomed"
        self.dirty.add(p)
        rest, p.hs = p.hs.rest, None
        return p.conn.typed(rest)

    def _join(self, p, msg, ctl, now):
        """The first message after the handshake: the worker's info."""
        if p.state == "welcomed" and type(msg) is messages.Info and self.release:
            p.conn.send("exit", {"reason": "the run is over", "final": True})
            p.state = "released"
            self.released += 1
            self.dirty.add(p)
            with self.cond:
                self.cond.notify_all()
        elif p.state == "welcomed" and type(msg) is messages.Info:
            p.state = "joined"
            self.peers[p.wid] = p
            if p.conn.unix:       # a worker on this machine: others reach its files on the loopback
                ctl.setdefault("host", "127.0.0.1")
                ctl["addr"] = "127.0.0.1:%s" % ctl.get("port", 0)
                ctl["link"] = "unix"
            else:
                ctl.setdefault("host", p.conn.peer.rsplit(":", 1)[0])
                ctl["addr"] = p.conn.peer
                ctl["link"] = "tls" if p.conn.tls else "tcp"
            self._feed(WorkerJoined(p.wid, ctl), now)
        else:
            raise ProtocolError("expected the worker's info, got %r" % msg.NAME)

    # ---------------------------------------------------------------- messages from workers
    def _on_pong(self, p, msg, ctl, now):
        pass

    def _on_ping(self, p, msg, ctl, now):
        p.conn.send_msg(messages.Pong())
        self.dirty.add(p)

    def _on_cached(self, p, msg, ctl, now):
        self._feed(FileCached(p.wid, msg.cn, msg.size or 0), now)

    def _on_error(self, p, msg, ctl, now):
        self.record({"event": "worker error", "worker": p.wid, "reason": msg.reason})
        if msg.cn and msg.cn in p.wanted:
            p.wanted.discard(msg.cn)
            self._feed(FetchFailed(msg.cn), now)
        elif msg.cn:        # it dropped its copy (a task modified it): sent again when a task needs it there
            self._feed(FileDropped(p.wid, msg.cn, msg.reason), now)

    def _in_flight(self, p, tid, att):
        """sent[tid] if it is the attempt `att` names (None: the first) in flight on p's worker;
        else None: what came is stale -- its task went elsewhere or ended, or it is of an attempt
        killed there (the core says so of a result)."""
        sent = self.sent.get(tid)
        if sent is not None and sent[0] == p.wid and sent[2] == messages.attempt(att):
            return sent
        return None

    def _on_result(self, p, msg, ctl, now):
        tid = msg.id
        if self._in_flight(p, tid, msg.att) is not None:
            del self.sent[tid]
            errs = p.out_errors.pop(tid, None)
            if errs and msg.status == "success":
                # the task did its part: the manager could not keep what it sent (TaskVine's word)
                ctl["status"] = "output transfer error"
                ctl["reason"] = "the manager could not write %s: %s" % (
                    "its output" if len(errs) == 1 else "%d outputs" % len(errs), "; ".join(errs))
        self._feed(TaskResult(p.wid, tid, ctl, msg.value), now)

    def _on_started(self, p, msg, ctl, now):
        self._feed(TasksStarted(p.wid, msg.ids, msg.att), now)

    def _on_outfile(self, p, msg, ctl, now):
        self.bytes_received += len(msg.data)
        tid, remote = msg.id, msg.remote
        key = (tid, remote)
        f = p.parts.get(key)
        sent = self._in_flight(p, tid, msg.att)
        if f is not None and (f.att == msg.att) == (sent is None):
            # a file begun by an attempt no longer in flight here (this one, killed; or another,
            # this chunk's being the live one): not finished by its late chunks, nor continued by
            # the next attempt's
            del p.parts[key]
            f.abort()
            f = None
        if sent is None:
            return
        if f is None:
            dest = next((fl for fl, r in sent[1] if r == remote and fl.kind == "file"), None)
            if dest is None:
                raise ProtocolError("output %r is not an output of task %s" % (remote, tid))
            if msg.last and not msg.tar:
                # the whole file in one chunk: one write in place, no temporary file and rename; a
                # missing folder is made, as for a larger one (comm/receive.py, parents=True)
                try:
                    try:
                        out = open(dest.source, "wb")
                    except FileNotFoundError:
                        os.makedirs(os.path.dirname(dest.source), exist_ok=True)
                        out = open(dest.source, "wb")
                    with out:
                        out.write(msg.data)
                except OSError as e:
                    _output_error(p, tid, dest.source, e)
                dest.invalidate()
                return
            f = p.parts[key] = Incoming(dest.source, "%s.vinehpc-part-%s" % (dest.source, tid),
                                        tar=msg.tar, parents=True)
            f.output, f.att = dest, msg.att
        f.write(msg.data)
        if msg.last:
            del p.parts[key]
            try:
                f.finish()
            except (OSError, tarfile.TarError) as e:
                _output_error(p, tid, f.dest, e)
            f.output.invalidate()

    def _on_watch(self, p, msg, ctl, now):
        """New bytes of a watched output of a running task: written in place at their offset (off
        0: a new attempt starts the file again); the final outfile replaces the whole file."""
        sent = self._in_flight(p, msg.id, msg.att)
        if sent is None:
            return
        dest = next((fl for fl, r in sent[1] if r == msg.remote and fl.kind == "file"), None)
        if dest is None:
            raise ProtocolError("output %r is not an output of task %s" % (msg.remote, msg.id))
        try:
            fd = os.open(dest.source, os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if msg.off == 0 else 0), 0o644)
            try:
                os.pwrite(fd, msg.data, msg.off)
            finally:
                os.close(fd)
        except OSError as e:
            log.warning("cannot write watched output %r: %s", dest.source, e)
        dest.invalidate()

    def _on_file(self, p, msg, ctl, now):
        self.bytes_received += len(msg.data)
        n = msg.cn
        f = p.fetch.get(n)
        if f is None:
            try:
                check_cachename(n)      # one plain file name in staging, as the worker checks its cache's
            except ValueError:
                raise ProtocolError("file message: cache name %r is not a plain file name" % n[:80]) from None
            if n not in p.wanted:       # only what we asked this worker for (GetFile) is written
                p.unasked += 1
                if p.unasked <= 3:
                    log.warning("dropped %s from worker %s: not asked for%s", n, p.wid,
                                " (further ones are not logged)" if p.unasked == 3 else "")
                    self.record({"event": "unasked file", "worker": p.wid, "file": n})
                return
            p.wanted.discard(n)
            path = os.path.join(self.staging, n)
            f = p.fetch[n] = Incoming(path, path + ".part")
        f.write(msg.data)
        if msg.last:
            del p.fetch[n]
            try:
                f.finish()
            except OSError as e:    # staging full: say so, and the file may be fetched again (it was a crash)
                log.error("cannot store %s fetched from worker %s: %s", n, p.wid, e)
                self._feed(FetchFailed(n), now)
                return
            self._feed(FileFetched(n, f.dest), now)

    def _on_fetched(self, p, msg, ctl, now):
        self._feed(TransferDone(p.wid, msg.cn, msg.ok, msg.size or 0, msg.secs, msg.reason, bool(msg.mine)), now)

    _handlers = {messages.Pong: _on_pong, messages.Ping: _on_ping, messages.Cached: _on_cached,
                 messages.Error: _on_error, messages.Result: _on_result, messages.Outfile: _on_outfile,
                 messages.Watch: _on_watch, messages.File: _on_file, messages.Started: _on_started,
                 messages.Fetched: _on_fetched}

    # ---------------------------------------------------------------- commands from the core
    def _carry(self, cmds):
        do, record = self._do, self.record
        for c in cmds:
            if type(c) is dict:     # a journal record (most commands: 3 to 4 a task): no trip through the table
                record(c)
            else:
                do[type(c)](self, c)

    def _to_worker(self, c, send):
        p = self.peers.get(c.wid)
        if p is None:
            return          # gone: the core hears of it as WorkerLost
        try:
            send(self, p, c)
        except Exception as e:   # one bad file or task must not stop the manager
            self._cmd_failed(p, c, e)
            return
        self.dirty.add(p)

    def _cmd_failed(self, p, c, e):
        kind = type(c).__name__
        why = "%s: %s" % (type(e).__name__, e)
        self.record({"event": "error", "worker": p.wid, "command": kind, "reason": why})
        if isinstance(c, cmd.PutFile):
            # the file could not be read: the worker will not have it
            self._feed(PutFailed(p.wid, c.cachename), time.monotonic())
        elif isinstance(c, cmd.SendTask):
            self.sent.pop(c.tid, None)
            res = {"status": "failed", "reason": "could not send the task: " + why}
            if "att" in c.spec:
                res["att"] = c.spec["att"]
            self._feed(TaskResult(p.wid, c.tid, res), time.monotonic())
        if not isinstance(e, OSError):
            log.error("manager could not carry out %s for worker %s: %s", kind, p.wid, why)

    def _send_function(self, p, c):
        p.conn.send("fn", {"fid": c.fid}, [c.data])

    def _put(self, p, c):
        f, n = c.file, c.cachename
        if f.kind == "buffer":       # executable, as in TaskVine: a buffer may be the `./script.sh` a task runs
            p.conn.send("put", {"cn": n, "off": 0, "last": True, "kind": "file", "size": len(f.data),
                                "level": f.cache, "mode": 0o755}, [f.data])
            return
        if f.kind == "temp":
            path, kind = c.path, "file"
        elif f.is_dir():
            path, kind = self._tar(f, n), "tar"
        else:
            path, kind = f.source, "file"
        fh = open(path, "rb")
        ctl = {"cn": n, "kind": kind, "level": f.cache, "mode": os.fstat(fh.fileno()).st_mode & 0o777}
        if c.ack:
            ctl["ack"] = True
        # a transfer (ack): its worker passes it on to peers as it arrives, a frame at a time
        p.conn.send_stream(file_chunks(fh, "put", ctl, PUT_PIECE if c.ack else CHUNK))

    def _tar(self, f, n):
        path = self.tars.get(n)
        if path is None:
            path = os.path.join(self.staging, n + ".tar")
            with tarfile.open(path + ".part", "w") as tar:
                tar.add(f.source, arcname=".")
            os.replace(path + ".part", path)
            self.tars[n] = path
        return path

    def _send_task(self, p, c):
        self.sent[c.tid] = (p.wid, c.outputs, messages.attempt(c.spec.get("att")))
        p.conn.send("task", c.spec, [c.payload] if c.payload is not None else ())

    def _forget(self, p, c):
        p.conn.send("forget", {"fid": c.fid})

    def _kill(self, p, c):
        self.sent.pop(c.tid, None)      # outputs still coming from that attempt are stale
        p.conn.send("kill", {"id": c.tid})

    def _unlink(self, p, c):
        p.conn.send("unlink", {"cn": c.cachename})

    def _fetch(self, p, c):
        p.conn.send_msg(messages.Fetch(cn=c.cachename, host=c.host, port=c.port, size=c.size, level=c.level,
                                       digest=c.digest))

    def _get(self, p, c):
        p.wanted = added(p.wanted, c.cachename)
        p.conn.send("get", {"cn": c.cachename})

    def _resolve(self, c):
        """Name a file a task made (read and hashed here, on the I/O side, never in the core)."""
        f = c.file
        try:
            ev = FileResolved(f.id, f.cachename(), f.size())
        except OSError as e:
            ev = FileResolved(f.id, None, error="input file %r cannot be read: %s" % (f.source, e))
        self._feed(ev, time.monotonic())

    def _finished(self, c):
        t = c.task
        self.sent.pop(t.id, None)
        if c.on_done is not None:
            c.on_done(t)
        else:
            self._returned.append(t)
        if self.resume is not None and t.successful() and not t.resumed:
            self.journal.write(self.resume.record(t))

    def _drained(self, c):
        self._hand_over()       # the tasks it cancelled reach wait() before it raises Resumable
        with self.cond:
            self.drained = True
            self.cond.notify_all()

    def handing(self) -> list:
        """Tasks finished during this loop turn, not yet in `done` (for a call on this thread)."""
        return self._returned

    def _hand_over(self):
        if self._returned:
            done, self._returned = self._returned, []
            with self.cond:
                self.done.extend(done)
                self.cond.notify_all()

    _do = {
        cmd.TaskFinished: _finished,
        cmd.TaskStarted: lambda self, c: c.on_start(c.task),
        cmd.Drained: _drained,
        cmd.ResolveFile: _resolve,
        cmd.SendFunction: lambda self, c: self._to_worker(c, Server._send_function),
        cmd.PutFile: lambda self, c: self._to_worker(c, Server._put),
        cmd.SendTask: lambda self, c: self._to_worker(c, Server._send_task),
        cmd.KillTask: lambda self, c: self._to_worker(c, Server._kill),
        cmd.DropFunction: lambda self, c: self._to_worker(c, Server._forget),
        cmd.GetFile: lambda self, c: self._to_worker(c, Server._get),
        cmd.Fetch: lambda self, c: self._to_worker(c, Server._fetch),
        cmd.UnlinkFile: lambda self, c: self._to_worker(c, Server._unlink),
    }

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
        self._feed(TICK, now)
        self.status.tick(int(time.time()))
        if self.want_snapshot:
            self.snapshot = self.status_snapshot()
        if not self.accepting and self.admission.may_listen(now):
            self._listen(True)
        said = self.admission.summary(now)
        if said is not None:
            self.record({"event": "connections closed", "count": said[0], "reasons": said[1]})
            log.warning("closed %d more connections of unauthenticated peers (%s)", said[0],
                        ", ".join("%s: %d" % kv for kv in said[1].items()))
        for p in list(self.all):
            if p.state == "status":
                if now - p.last_recv > STATUS_IDLE:
                    self._drop(p, "status client idle")
                continue
            if p.state != "joined":
                if now - p.since > HANDSHAKE_TIMEOUT:
                    self._drop(p, "no handshake within %.0f s" % HANDSHAKE_TIMEOUT)
                continue
            if now - p.last_recv > self.ka_timeout:
                self._drop(p, "no message for %.0f s (keepalive timeout)" % (now - p.last_recv))
            elif now - p.last_recv > 2 * self.ka_interval and now - p.last_send > self.ka_interval / 2:
                # a worker pings after ka_interval without hearing from us: a live idle one has
                # spoken by now.  Asking at ka_interval too made both sides ping at once and both
                # answer: twice the messages an idle fleet needs (a thousand a second at 5,000)
                p.conn.send("ping")
                self.dirty.add(p)
        if self.stopping and now > getattr(self, "_stop_deadline", now):
            for p in list(self.all):
                self._drop(p, "manager stopped")
