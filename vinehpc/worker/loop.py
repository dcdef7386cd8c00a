"""The worker's event loop: one selectors loop over the manager connection, the task
processes (pidfds), the Python interpreters (socketpairs) and a wake-up socket for the
URL fetches and image unpacks done on helper threads.

What arrives becomes an event for the state machine (state.py); the commands it returns are
carried out here (messages, background work, files) and by execution.py (tasks).  Nothing
here decides what runs when.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import logging
import os
import selectors
import socket
import tarfile
import time

from ..comm import file_chunks, peer
from ..protocol import ProtocolError, messages
from . import orphans
from .cache import Cache
from .events import (DropTask, FetchPeer, FetchRequested, FetchURL, FileFailed, FileStored, FunctionReceived,
                     InputFailed, InputReady, KillRequested, KillTask, PeerFetched, PresentTask, Requeued,
                     SendCached, SendFetched, SendResult, SessionEnded, StartTask, TaskFinished, TaskReceived,
                     TaskSpec, Tick, Unlink, UnlinkRequested, UnpackImage, check_cachename)
from .execution import Execution
from .process import Guardian
from .pypool import PyPool
from .state import WorkerState

log = logging.getLogger("vinehpc.worker")


MAX_SLEEP = 3600.0
# Seconds a prestarted call (Loop._on_task) waits for its result before the state machine is handed
# its start anyway: a short call's start and end are then handed over together, after its result
# went out; a longer one is in the state's books (its time limit, its resource sampling) after this.
DEFER_WAIT = 0.002


class ManagerGone(Exception):
    pass


class SessionOver(Exception):
    """The manager ended its workflow; the run goes on (a pilot's next manager)."""


class Loop:
    def __init__(self, *, workdir, total, gpu_ids, hostname, reconnect, default_image=None):
        self.workdir = workdir
        self.total = total
        self.hostname = hostname
        self.reconnect = reconnect
        self.sel = selectors.DefaultSelector()
        self._wr, self._ww = socket.socketpair()
        self._wr.setblocking(False)
        self.sel.register(self._wr, selectors.EVENT_READ, ("wake", None))
        self.cache = Cache(os.path.join(workdir, "cache"))
        # orphans of tasks (setsid daemons) become our children, so they can be found and killed
        if not orphans.become_subreaper():
            log.warning("cannot become a child subreaper: processes tasks leave in their own sessions may outlive them")
        self.guard = Guardian(workdir)
        self.pool = PyPool(self.sel, max_runners=max(1, total["cores"]), workdir=workdir, guard=self.guard)
        self.fetcher = cf.ThreadPoolExecutor(4, thread_name_prefix="vinehpc-fetch")
        self.fetched = collections.deque()     # (what, cachename, future) handed over by helper threads
        self.notices = collections.deque()     # what the transfer server's threads want told to the manager
        self.secret = None         # the run's secret (peer fetches prove it), set by Worker
        self.stall = peer.STALL    # seconds without a byte before a fetch from a peer is given up (Worker: settings)
        self.state = WorkerState(total, gpu_ids, files=self.cache.entries)
        self.exec = Execution(self.sel, self.pool, self.cache, self.guard, workdir=workdir, hostname=hostname,
                              default_image=default_image)
        self.events = collections.deque()      # fed to the state machine in order
        self.deferred = {}         # tid -> (TaskReceived, when): prestarted calls the state has not been handed yet
        self.feeding = False
        self.conn = None           # the manager's Connection, set by the handshake (main.py)
        self._writing = False      # the connection's socket is registered for writability
        self.last_recv = 0.0
        self.last_ping = 0.0       # when we last pinged the manager
        self.exit_requested = False
        self.ka = (5.0, 30.0)      # keepalive (interval, timeout), the manager's welcome may change it

    @property
    def conn(self):
        return self.exec.conn

    @conn.setter
    def conn(self, c):       # execution.py reports dropped inputs on it at once
        self.exec.conn = c

    # ---------------------------------------------------------------- the state machine
    def feed(self, event) -> None:
        """Hand an event to the state machine and carry out its commands; events that carrying
        them out produces are handled after them, in order."""
        self.events.append(event)
        if self.feeding:
            return
        self.feeding = True
        try:
            while self.events:
                for c in self.state.handle(self.events.popleft(), time.monotonic()):
                    self.events.extend(self._DO[type(c)](self, c) or ())
        finally:
            self.feeding = False

    def _do_start(self, c):
        spec = c.spec
        if spec.cmd is not None and spec.report_start:
            # a command whose start the manager does not assume (sent ahead, or it waited here)
            # is spawned only once its start -- and the results before it, on which it may ride --
            # are on their way: one that kills its worker at once (`kill -9 $PPID`, the OOM killer)
            # is then known to have run here, and the loss counts against it, not against the task
            # before it whose result would have died with the worker
            self._send_to_manager()
        return self.exec.start(c)

    def _do_kill(self, c):
        self.exec.kill(c.tid)

    def _do_drop(self, c):
        return self.exec.forget(c.tid, stop=c.stop)

    def _do_requeued(self, c):
        return self.exec.forget(c.tid)

    def _do_result(self, c):
        if c.status != "success":      # only failures: a line per task would cost the hot path
            log.info("task %s: %s: %s", c.tid, c.status, c.reason)
        if c.sent:                     # (_results_now): what is left is cleaning up
            return self.exec.report(c, self.conn)
        return self.exec.report(c, self.conn, *self._riding_starts())

    def _riding_starts(self):
        """(ids, their attempt numbers or None): the starts not told yet, to ride on the result
        being sent (this task's own, if it is among them: the manager logs that one before the
        result, the others -- the next of its lane -- after); (None, None) when too many for one
        message (they go in `started` messages)."""
        starts = self.state.take_starts()
        if len(starts) > messages.MAX_STARTED:
            self._send_starts(starts)
            return None, None
        return starts, self.state.starts_att(starts) if starts else None

    def _results_now(self, events) -> None:
        """An interpreter's results whose end the state will report as they are (plain_end: a
        Python call without files, nothing queued or presented behind it) go to the manager now,
        before the state's and the execution's bookkeeping of the end: the round trip of a
        sequential call does not wait for it.  The end is then handed to the state as usual
        (`sent`: its SendResult only cleans up)."""
        conn = self.conn
        if conn is None:
            return
        now = None
        for e in events:
            if type(e) is not TaskFinished or e.exhausted is not None:
                continue
            r = self.state.plain_end(e.tid, e.runner)
            if r is None:
                continue
            if now is None:
                now = time.monotonic()
            self.exec.send_plain_result(conn, e.tid, e.error, e.stdout, e.result, now - r.started,
                                        *self._riding_starts(), att=r.spec.att)
            e.sent = True
        if now is not None:
            self._flush()

    def _book(self):
        """Hand the prestarted calls to the state machine (see _on_task), in the order they came."""
        d, self.deferred = self.deferred, {}
        for ev, _ in d.values():
            self.feed(ev)

    def _deferred_results(self, runner) -> list:
        """An interpreter answered while prestarted calls wait for the state (_on_task).  A
        prestarted call's result that the state would report as it is (success, or the function's
        error, within its memory; see WorkerState.plain_end) goes to the manager first, measured as
        the execution would have measured it; then the state is handed the calls' starts, then
        what the interpreter said (the ends it sent marked `sent`)."""
        items = self.pool.readable(runner)
        conn = self.conn
        sent = set()
        if conn is not None and not self.state.queue:
            now = None
            for tid, payload in items:
                d = self.deferred.get(tid)
                if d is None or payload is None or d[0].spec.report_start:
                    continue
                h = self.exec.measured_end(d[0].spec, payload)
                if h.mon.over(h.spec.res) is not None:
                    continue            # over its memory: the state reports it (killed, retried larger)
                if now is None:
                    now = time.monotonic()
                self.exec.send_plain_result(conn, tid, payload[1], payload[2], payload[0], now - d[1],
                                            *self._riding_starts(), att=h.spec.att, h=h)
                sent.add(tid)
            if sent:
                self._flush()
        self._book()
        events = self.exec.runner_readable(runner, items)
        for e in events:
            if type(e) is TaskFinished and e.tid in sent:
                e.sent = True
        return events

    def _send_starts(self, ids):
        """A `started` message (several for more ids than one may carry)."""
        if self.conn is not None:
            for i in range(0, len(ids), messages.MAX_STARTED):
                part = ids[i:i + messages.MAX_STARTED]
                att = self.state.starts_att(part)
                self.conn.send("started", {"ids": part, "att": att} if att else {"ids": part})

    def _do_cached(self, c):
        if self.conn is not None:
            self.conn.send("cached", {"cn": c.cachename})

    def _do_unlink(self, c):
        self.cache.remove(c.cachename)

    def _do_fetch(self, c):
        self._in_background("url", c.cachename, self.cache.fetch_url, c.cachename, c.url)

    def _do_fetch_peer(self, c):
        self._in_background("peer", c.cachename, self._fetch_peer, c)

    def _fetch_peer(self, c):
        """(helper thread) The file from the worker at c.host:c.port; (bytes, seconds)."""
        t0 = time.monotonic()
        got = self.cache.fetch_peer(c.cachename, c.host, c.port, self.secret, c.size, c.digest, self.stall)
        return got, time.monotonic() - t0

    def _do_fetched(self, c):
        if c.ok:
            log.debug("fetched %s (%d bytes, %.3f s)", c.cachename, c.size, c.secs)
        else:
            log.warning("could not fetch %s from a peer: %s", c.cachename, c.reason)
        if self.conn is not None:
            self.conn.send_msg(messages.Fetched(cn=c.cachename, ok=c.ok, size=c.size if c.ok else None,
                                                secs=round(c.secs, 6) if c.ok else None, reason=c.reason,
                                                mine=c.local or None))

    def _do_unpack(self, c):
        from sysimage_tools.deploy import ensure_local   # only workers that run images need it
        self._in_background("image", c.cachename, ensure_local, self.cache.path(c.cachename), c.url)

    _DO = {StartTask: _do_start, PresentTask: _do_start, KillTask: _do_kill, DropTask: _do_drop,
           Requeued: _do_requeued, SendResult: _do_result, SendCached: _do_cached, Unlink: _do_unlink,
           FetchURL: _do_fetch, UnpackImage: _do_unpack, FetchPeer: _do_fetch_peer, SendFetched: _do_fetched}

    # ---------------------------------------------------------------- background work
    def _in_background(self, what, n, fn, *args):
        self.fetcher.submit(fn, *args).add_done_callback(lambda f: self._background_done(what, n, f))

    def _background_done(self, what, n, fut):
        self.fetched.append((what, n, fut))       # (helper thread) hand over to the loop
        self._wake()

    def _wake(self):
        """(any thread) Wake the loop: something was handed over to it."""
        try:
            self._ww.send(b"x")
        except OSError:
            pass

    def _fetches_done(self):
        while self.fetched:
            what, n, fut = self.fetched.popleft()
            err = fut.exception()
            if what == "peer":
                self.feed(PeerFetched(n, True, *fut.result()) if err is None else
                          PeerFetched(n, False, reason=str(err), local=getattr(err, "local", False)))
                self.cache.arriving.settle(n)       # (after the inventory has it: see serve_path)
                continue
            if err is not None:
                self.feed(InputFailed(what, n, str(err)))
                continue
            if what == "image":
                self.exec.images[n] = fut.result()
            self.feed(InputReady(what, n))

    # ---------------------------------------------------------------- the loop
    def _serve(self):
        conn = self.conn
        # messages that arrived with the welcome
        for msg, _ in conn.typed(b""):
            self._message(msg)
        self._send()
        sleep = DEFER_WAIT if self.deferred else self._next_timer()
        while not self.exit_requested:
            ready = self.sel.select(sleep)
            if self.deferred and not ready:
                self._book()            # DEFER_WAIT passed: the calls are in the state's books now
            for key, ev in ready:
                what, obj = key.data
                if self.deferred and not (what == "runner" and obj.tid in self.deferred):
                    self._book()        # anything else happens after the prestarted calls' starts
                if what == "manager":
                    if ev & selectors.EVENT_READ:
                        msgs = conn.typed()
                        self.last_recv = time.monotonic()
                        for msg, _ in msgs:
                            self._message(msg)
                            if self.exit_requested:
                                return
                elif what == "proc":
                    for e in self.exec.proc_exited(obj):
                        self.feed(e)
                elif what == "out":
                    self.exec.proc_output(obj)
                elif what == "runner":
                    if self.deferred:
                        events = self._deferred_results(obj)
                    else:
                        events = self.exec.runner_readable(obj)
                        self._results_now(events)
                    for e in events:
                        self.feed(e)
                elif what == "wake":
                    try:
                        self._wr.recv(4096)
                    except BlockingIOError:
                        pass
                    self._fetches_done()
                    self._tell_notices()
            # what these events made goes out before the timers run: a result's way back to the
            # manager (and a task's way to its interpreter) does not wait for the sampling
            self._send()
            if self.deferred:
                sleep = DEFER_WAIT      # the timers run once the state has the prestarted calls
                continue
            sleep = self._timers()

    def _send(self):
        self._send_to_manager()
        self.pool.flush()
        self.guard.flush()

    def _send_to_manager(self):
        if self.state.starts:        # started and not told with a result: one message
            self._send_starts(self.state.take_starts())
        self._flush()

    def _flush(self):
        conn = self.conn
        if conn is None or conn.closed or not conn.out:
            return
        done = conn.flush()
        if done == self._writing:        # interest in writability changes: tell epoll
            self._writing = not done
            self.sel.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE if self._writing
                            else selectors.EVENT_READ, ("manager", None))

    def notice(self, text):
        """(a transfer server thread) Something the manager's journal should say (a peer refused)."""
        log.warning("%s", text)
        self.notices.append(text)
        self._wake()

    def _tell_notices(self):
        while self.notices:
            text = self.notices.popleft()
            if self.conn is not None:
                self.conn.send_msg(messages.Error(reason=text))

    def serve_path(self, n):
        """(a transfer server thread) The path of cache entry n if this worker holds it, else None:
        a copy on its way here is served from `cache.arriving`, which keeps it until the inventory
        has it (settled after FileStored, PeerFetched), so a peer never finds neither."""
        return self.cache.path(n) if self.state.files.get(n) is not None else None

    def _next_timer(self, now=None, deadline=None, running=None):
        """Seconds the loop may sleep: at most MAX_SLEEP, however long a keepalive interval or a
        time_max the manager sends (epoll refuses a timeout past ~24 days: the worker died).
        (`deadline`, `running`: the state's, when the caller has them already.)"""
        if now is None:
            now = time.monotonic()
            deadline, running = self.state.next_deadline(), self.state.running()
        t = min(self.ka[0], MAX_SLEEP)
        if deadline is not None:
            t = min(t, deadline - now)
        if running:
            t = min(t, self.exec.monitor_due(now, running))
        for due in (self.exec.watch_due(now), self.exec.sweep_due(now)):
            if due is not None:
                t = min(t, due)
        return max(0.0, t)

    def _timers(self):
        """Run what is due, send what that made; returns the seconds the loop may sleep (one
        pass over the state's deadlines and running tasks a turn, not two)."""
        now = time.monotonic()
        st = self.state
        d = st.next_deadline()
        running = st.running()
        fed = False
        if d is not None and now >= d:      # (Tick is the state's time limits: fed only when one is due)
            self.feed(Tick())
            fed = True
        if running:
            for e in self.exec.sample(now, running):
                self.feed(e)
                fed = True
        self.exec.stream_watched(now, self.conn)
        self.exec.sweep(now)
        if now - self.last_recv > self.ka[1]:
            raise ManagerGone("no message from the manager for %.0f s" % (now - self.last_recv))
        # heard nothing for a while: ask (once per silence; the manager answers pong).  Not only
        # when we are silent too: a worker streaming a watched output is never silent, and the
        # manager pings only a silent worker, so neither would speak and we would time out.
        if now - self.last_recv > self.ka[0] and self.last_ping <= self.last_recv:
            self.conn.send("ping")
            self.last_ping = now
        if fed or self.conn.out:
            self._send()        # what the timers made (pings, kills, watched output)
            return self._next_timer()
        return self._next_timer(now, d, running)

    def _end_session(self):
        self._book()
        self.events.clear()
        self.feed(SessionEnded())
        if self.conn is not None:
            try:
                self.sel.unregister(self.conn.sock)
            except (KeyError, ValueError):
                pass
            self.conn.close()
            self.conn = None
        self.cache.abort_parts()
        self.exec.fns.clear()

    def close(self):
        self.pool.close()
        self.guard.close()
        self.fetcher.shutdown(wait=False, cancel_futures=True)

    # ---------------------------------------------------------------- messages from the manager
    def _message(self, msg):
        """`msg`: typed and validated (Connection.typed)."""
        if self.deferred:
            self._book()         # (a batch: the calls before this message are in the books first)
        name = msg.NAME
        h = self._ON.get(type(msg))
        if h is None:
            raise ProtocolError("unexpected message %r from the manager" % name)
        try:
            h(self, msg)
        except ValueError as e:      # a cache name that could leave the cache
            raise ProtocolError("%s message: %s" % (name, e)) from None

    def _on_ping(self, m):
        self.conn.send("pong")

    def _on_pong(self, m):
        pass

    def _on_exit(self, m):
        log.info("the manager says exit: %s", m.reason)
        if m.final is not False or not self.reconnect:
            self.exit_requested = True
        else:
            raise SessionOver(m.reason or "the manager closed")

    def _on_fn(self, m):
        self.exec.fns[m.fid] = m.data
        self.feed(FunctionReceived(m.fid))

    def _on_put(self, m):
        n = m.cn
        if n in self.state.put_errors:
            if m.last and m.ack:
                self._not_stored(n, self.state.put_errors[n][0])
            return
        try:
            stored = self.cache.put_chunk(n, m.data, m.last, m.kind, 0o444 if m.mode is None else m.mode, m.size)
        except (OSError, tarfile.TarError) as e:   # disk full, quota: the tasks that need it fail, the worker goes on
            why = "cannot store input %s on worker %s: %s" % (n, self.hostname, e)
            log.error("%s", why)
            if m.ack:
                self._not_stored(n, why)
            return self.feed(FileFailed(n, why, worker_fault=isinstance(e, OSError)))
        if stored:
            self.feed(FileStored(n, m.level))
            self.cache.arriving.settle(n)
            if m.ack:       # a transfer the manager counts: the worker may now serve it to its peers
                self.conn.send_msg(messages.Cached(cn=n, size=m.size))

    def _not_stored(self, n, why):
        """A put the manager counts as a transfer (ack) ended with no copy here, by this worker's fault."""
        self.conn.send_msg(messages.Fetched(cn=n, ok=False, reason=why, mine=True))

    def _on_unlink(self, m):
        self.feed(UnlinkRequested(check_cachename(m.cn)))

    def _on_get(self, m):
        n = m.cn
        try:
            fh = open(self.cache.path(n), "rb")
        except (OSError, ValueError) as e:
            self.conn.send("error", {"cn": n, "reason": "cannot send %s: %s" % (n, e)})
            return
        self.conn.send_stream(file_chunks(fh, "file", {"cn": n}))

    def _on_fetch(self, m):
        self.feed(FetchRequested(check_cachename(m.cn), m.host, m.port, m.size, m.level, m.digest))

    def _on_kill(self, m):
        self.feed(KillRequested(m.id))

    def _on_forget(self, m):
        self.pool.forget(m.fid)

    def _on_task(self, m):
        spec = TaskSpec.from_message(m)
        at_once = self.state.starts_now(spec)
        if at_once is not None:
            # on its way to the interpreter before the state machine and the execution's
            # bookkeeping of its start (which then takes that interpreter): off the call's way
            self.exec.prestart(spec, m.args, at_once[0])
            if spec.id in self.exec.prestarted and not isinstance(self.exec.prestarted[spec.id], OSError):
                # ... and that bookkeeping waits for the call's result (DEFER_WAIT at most): the
                # kernel often wakes the interpreter on this CPU (a socket write is a "sync" wake-up,
                # made for a writer about to sleep), and the interpreter's result then waited for
                # the rest of it (benchmarks/hops.py: 108 us instead of 25).  Anything else that
                # happens first -- a message, another interpreter, a timer -- hands it over first.
                self.deferred[spec.id] = (TaskReceived(spec, m.args), time.monotonic())
                return
        self.feed(TaskReceived(spec, m.args))

    _ON = {messages.Ping: _on_ping, messages.Pong: _on_pong, messages.Exit: _on_exit, messages.Fn: _on_fn,
           messages.Put: _on_put, messages.Unlink: _on_unlink, messages.Get: _on_get, messages.Kill: _on_kill,
           messages.Task: _on_task, messages.Forget: _on_forget, messages.Fetch: _on_fetch}
