"""The worker's decisions, with no I/O: `WorkerState.handle(event, now) -> [command]`.

Events and commands are the dataclasses of events.py; loop.py feeds the events in and carries
the commands out.  No sockets, processes, files or clock here: time comes in as `now`.

A task's life:  waiting (a URL fetch, an image unpack) -> queued (until cores, memory, disk
and gpus fit) -> running -> done.  A short Python task may skip the wait for resources:
it is *presented* to an interpreter busy with a task at least as large (pipelining), and
starts -- holds resources, its clock runs -- the moment that task returns.  Up to DEPTH tasks
wait so in one interpreter's lane, each no larger than the one before it, so the interpreter
runs them back to back, never idle waiting for the loop, and each start needs no room.  A task
dropped while presented stays in its lane (the interpreter has it and runs it anyway): its turn
holds its resources until it returns, and its result is ignored.

Starts the manager hears of (`starts`, for tasks whose spec has report_start): a task starts at
`_begin`.  For a presented task that is when the worker sees the task before it in its lane
return: the interpreter took it up a moment earlier (when it returned that one), and the worker
does not ask it -- the same instant its `wall` is measured from.

Cache references: every input a waiting/queued/running task names is referenced; an entry
is unlinked only when nobody references it (task-level inputs: as soon as their last user
ends; others when the manager asks, or at the end of the workflow unless worker-level).
"""
from __future__ import annotations

import collections

from ..protocol import ProtocolError
from ..protocol.messages import RES
from .events import (DropTask, Exhausted, FetchPeer, FetchRequested, FetchURL, FileFailed, FileStored,
                     FunctionReceived, InputFailed, InputReady, InputSpoiled, InterpreterDied, KillRequested, KillTask,
                     OnInterpreter, PeerFetched, PresentTask, Requeued, SendCached, SendFetched, SendResult,
                     SessionEnded, StartFailed, StartTask, TaskFinished, TaskReceived, Tick, Unlink, UnlinkRequested,
                     UnpackImage)

ORDER = {"task": 0, "workflow": 1, "worker": 2}     # cache levels, weakest first
DEPTH = 3          # tasks presented to one busy interpreter at most
GHOST_LIMIT = 10.0  # seconds a dropped task may hold its interpreter's turn before the interpreter is killed


def exhausted_reason(x) -> str:
    if x["resource"] == "time":
        return "time: %.1f s used > %g s allocated (the task's time limit)" % (x["used"], x["allocated"])
    return "%s: {:,} MB used > {:,} MB allocated".format(x["used"], x["allocated"]) % x["resource"]


class Run:
    """One task on this worker."""
    __slots__ = ("spec", "res", "args", "state", "started", "deadline", "waiting_for", "killed", "image",
                 "exhausted", "gpus", "runner")

    def __init__(self, spec, args):
        self.spec = spec
        self.res = spec.res        # read ~20 times per task on the hot path: a slot, not a property
        self.args = args
        self.state = "waiting"     # waiting -> queued (-> presented) -> running -> done
        self.started = None
        self.deadline = None
        self.waiting_for = set()   # (what, cachename) of background work it waits for
        self.killed = None         # (status, reason) once we decided to stop it
        self.image = None          # cache name of its environment image
        self.exhausted = None      # {"resource", "used", "allocated"} if it went over its allocation
        self.gpus = ()             # the device ids it holds while it runs
        self.runner = None         # the interpreter it runs on / is presented to


class WorkerState:
    def __init__(self, total: dict, gpu_ids=(), files=None):
        """total: the resources offered; gpu_ids: CUDA ids of its GPUs; files: cache name ->
        level of what the cache holds at start (this dict is kept up to date from then on)."""
        self.total = dict(total)
        self.gpu_ids = tuple(gpu_ids)
        self.no_gpus = "" if self.gpu_ids else None    # CUDA_VISIBLE_DEVICES of a task without GPUs
        self.files = {} if files is None else files
        self.refs = {}             # cache name -> waiting/queued/running tasks naming it
        self.put_errors = {}       # cache name -> (why it could not be stored, the worker's fault?)
        self.spoiled = {}          # cache name -> why the entry was dropped (a task modified it), until sent again
        self.fns = set()           # function ids received
        self.images = set()        # environment images unpacked (kept across managers)
        self.pending = {}          # (what, cachename) -> [Run waiting for that background work]
        # cachename -> (its cache level, its size), for files being fetched from a peer
        # (FetchRequested; served to other peers as they arrive); a task whose input is `expect`ed
        # waits on ("peer", name) until a fetch or a put brings it
        self.fetching = {}
        self.runs = {}             # tid -> Run
        self.queue = collections.deque()
        self.presented = {}        # busy interpreter -> deque of the Runs it runs next, in order
        self.ghosts = {}           # interpreter -> the dropped Run it runs now (holding that Run's resources)
        self.used = dict.fromkeys(RES, 0)
        self.gpu_free = list(self.gpu_ids)
        self.lib_running = {}      # library fid -> its calls running (limited by their spec.slots)
        # ids of tasks that started (and report_start) not yet told to the manager: the loop sends
        # them on the next result, or in one `started` message at the end of its turn
        self.starts = []
        self.start_att = {}        # of those, the ones sent again: id -> their task message's att
        self._out = []
        self._now = 0.0

    # ---------------------------------------------------------------- the interface
    def handle(self, event, now: float) -> list:
        self._out, self._now = [], now
        self._HANDLERS[type(event)](self, event)
        return self._out

    def next_deadline(self):
        """When the next running task reaches its time limit (None: none has one)."""
        ds = [r.deadline for r in self.runs.values() if r.state == "running" and r.killed is None
              and r.deadline is not None]
        ds.extend(g.deadline for g in self.ghosts.values())
        return min(ds) if ds else None

    def take_starts(self) -> list:
        """The started ids not yet told to the manager, in the order they started; forgotten here."""
        s, self.starts = self.starts, []
        return s

    def starts_att(self, ids) -> dict | None:
        """{str(id): att} for those of `ids` (taken from take_starts) sent again, forgotten here;
        None when none was (the common case: one test of an empty dict)."""
        if not self.start_att:
            return None
        att = {}
        for i in ids:
            a = self.start_att.pop(i, None)
            if a:
                att[str(i)] = a
        return att or None

    def running(self) -> list:
        """The running tasks not being stopped (for sampling)."""
        return [r for r in self.runs.values() if r.state == "running" and r.killed is None]

    # ---------------------------------------------------------------- arrivals
    def _task_received(self, ev: TaskReceived):
        spec = ev.spec
        if spec.id in self.runs:
            raise ProtocolError("task %s sent twice" % spec.id)
        r = self.runs[spec.id] = Run(spec, ev.args)
        if spec.error:
            return self._report(r, "input missing", spec.error)
        for i in spec.inputs:
            self.refs[i.cachename] = self.refs.get(i.cachename, 0) + 1
        for i in spec.inputs:
            n = i.cachename
            if n in self.put_errors:
                why, fault = self.put_errors[n]
                return self._report(r, "input missing", why, worker_fault=fault)
            if n in self.files:
                if ORDER.get(i.level, 0) > ORDER[self.files[n]]:   # the strongest level asked for wins
                    self.files[n] = i.level
            elif n in spec.expect or ("peer", n) in self.pending:
                # on its way (a fetch from a peer, or a put): the fetch that brings it is the
                # manager's to order (and to order again from elsewhere if this one fails)
                r.waiting_for.add(("peer", n))
                self.pending.setdefault(("peer", n), []).append(r)
            elif i.kind == "url":
                self._wait(r, ("url", n), FetchURL(n, i.url))
            elif n in self.spoiled:     # sent before the manager heard it was dropped: sent again or killed
                self._wait(r, ("put", n), None)
            else:
                return self._report(r, "input missing", "input %r (%s) was never sent to this worker" % (i.remote, n))
            if i.kind == "image":
                r.image = n
                if n not in self.images:
                    self._wait(r, ("image", n), UnpackImage(n, i.url))
        if spec.fid is not None and spec.fid not in self.fns:
            return self._report(r, "failed", "function %s was never sent to this worker" % spec.fid)
        if not r.waiting_for:
            self._enqueue(r)

    def _wait(self, r, key, cmd):
        """r waits for background work; the work is asked for once, whoever else waits."""
        r.waiting_for.add(key)
        waiting = self.pending.get(key)
        if waiting is not None:
            waiting.append(r)
        else:
            self.pending[key] = [r]
            if cmd is not None:
                self._out.append(cmd)

    def _input_ready(self, ev: InputReady):
        if ev.what == "url":
            self.files[ev.cachename] = "workflow"
            self._out.append(SendCached(ev.cachename))
        else:
            self.images.add(ev.cachename)
        self._arrived((ev.what, ev.cachename))

    def _arrived(self, key):
        """The background work or transfer `key` is done: the tasks that waited only for it queue."""
        for r in self.pending.pop(key, ()):
            if self.runs.get(r.spec.id) is r:
                r.waiting_for.discard(key)
                if not r.waiting_for:
                    self._enqueue(r)

    def _input_failed(self, ev: InputFailed):
        why = "cannot %s %s: %s" % ("fetch" if ev.what == "url" else "unpack the environment image",
                                    ev.cachename, ev.error)
        for r in self.pending.pop((ev.what, ev.cachename), ()):
            if self.runs.get(r.spec.id) is r:
                self._report(r, "input missing", why)

    def _function_received(self, ev: FunctionReceived):
        self.fns.add(ev.fid)

    def _file_stored(self, ev: FileStored):
        self.files[ev.cachename] = ev.level if ev.level in ORDER else "workflow"
        if self.spoiled.pop(ev.cachename, None) is not None:
            self._arrived(("put", ev.cachename))
        self._arrived(("peer", ev.cachename))      # the manager sent it itself (no peer could)

    def _input_spoiled(self, ev: InputSpoiled):
        n = ev.cachename
        self.files.pop(n, None)
        self.spoiled[n] = ev.reason
        for r in list(self.runs.values()):
            if r.state in ("waiting", "queued") and any(i.cachename == n for i in r.spec.inputs):
                r.state = "waiting"       # (a queued one is skipped by _start_queued until woken)
                self._wait(r, ("put", n), None)

    def _fetch_requested(self, ev: FetchRequested):
        n = ev.cachename
        if n in self.files:
            self._out.append(SendFetched(n, True, ev.size, 0.0, "already held"))
            return
        if n in self.put_errors:
            self._out.append(SendFetched(n, False, reason=self.put_errors[n][0], local=True))
            return
        if n in self.fetching:
            return          # one fetch at a time: the manager orders another only after `fetched`
        self.fetching[n] = (ev.level if ev.level in ORDER else "workflow", ev.size)
        self.pending.setdefault(("peer", n), [])
        self._out.append(FetchPeer(n, ev.host, ev.port, ev.size, ev.digest))

    def _peer_fetched(self, ev: PeerFetched):
        n = ev.cachename
        arriving = self.fetching.get(n)
        self._out.append(SendFetched(n, ev.ok, ev.size, ev.secs, ev.reason, ev.local))
        if ev.ok and arriving is not None:
            self.files[n] = arriving[0]     # (before it leaves `fetching`: a peer served from it never misses it)
        self.fetching.pop(n, None)
        if ev.ok and arriving is not None:
            self._arrived(("peer", n))
        elif ev.local:
            self._cannot_store(n, "cannot store input %s: %s" % (n, ev.reason), True)
        # failed: the tasks keep waiting; the manager orders the file from another source (or
        # the manager sends it, or it requeues them): a failed transfer never fails a task

    def _file_failed(self, ev: FileFailed):
        self._cannot_store(ev.cachename, ev.reason, ev.worker_fault)

    def _cannot_store(self, n, why, fault):
        """n cannot be kept here: the tasks that wait for it, and those that come for it, fail
        "input missing" (the worker's fault: they run elsewhere without spending a retry)."""
        self.put_errors[n] = (why, fault)
        for r in self.pending.pop(("peer", n), ()):
            if self.runs.get(r.spec.id) is r:
                self._report(r, "input missing", why, worker_fault=fault)

    def _unlink_requested(self, ev: UnlinkRequested):
        self._unlink(ev.cachename)

    # ---------------------------------------------------------------- queue and start
    def _enqueue(self, r):
        r.state = "queued"
        self.queue.append(r)
        self._start_queued()

    def _fits(self, res) -> bool:
        # a task larger than the whole worker still runs, alone (the manager sized it)
        used, total = self.used, self.total
        for k in RES:      # a plain loop: this runs for every queued task on every start attempt
            n = res[k]
            if n and used[k] and used[k] + n > total[k]:
                return False
        return True

    def _slots_full(self, spec) -> bool:
        """A library call whose library runs as many calls here as its slots allow."""
        return bool(spec.slots) and self.lib_running.get(spec.fid, 0) >= spec.slots

    def _start_queued(self):
        q = self.queue
        blocked = []
        while q:
            r = q.popleft()
            if r.state != "queued":
                continue
            if not self._fits(r.res) or self._slots_full(r.spec):
                blocked.append(r)
                continue
            self._begin(r)
            self._out.append(StartTask(r.spec, r.args, self._devices(r), r.image))
        q.extend(blocked)
        if q:
            self._present_next()

    def _begin(self, r):
        """r now holds its resources and its clock runs."""
        for k in RES:
            self.used[k] += r.res[k]
        n = r.res["gpus"]
        if n:
            r.gpus, self.gpu_free = tuple(self.gpu_free[:n]), self.gpu_free[n:]
        if r.spec.slots:
            self.lib_running[r.spec.fid] = self.lib_running.get(r.spec.fid, 0) + 1
        r.state = "running"
        r.started = self._now
        if r.spec.report_start:
            self.starts.append(r.spec.id)
            if r.spec.att:
                self.start_att[r.spec.id] = r.spec.att
        r.deadline = self._now + r.spec.time_max if r.spec.time_max else None

    def _devices(self, r):
        """Only the GPUs it holds; none for a task that asked for none (on a worker with GPUs)."""
        return ",".join(r.gpus) if r.res["gpus"] else self.no_gpus

    def _present_next(self):
        """Pipelining: give busy interpreters the next short Python tasks now, so each starts the
        moment the one before it returns instead of waiting a round trip through the loop."""
        q = self.queue
        while True:
            while q and q[0].state != "queued":
                q.popleft()
            if not q:
                return
            r = q[0]
            if not r.spec.pipe or not r.spec.python or r.res["gpus"]:
                return
            x = self._lane_for(r)
            if x is None:
                return
            q.popleft()
            r.state, r.runner = "presented", x
            self.presented.setdefault(x, collections.deque()).append(r)
            self._out.append(PresentTask(r.spec, r.args, self._devices(r), r.image, x))

    def _lane_for(self, r):
        """A busy interpreter whose lane takes r: fewer than DEPTH waiting there, r no larger than
        the task before it (so its start never needs room), in the same image, and of the same
        library if r's library limits its calls (its count of running calls stays the same)."""
        for cur in self.runs.values():
            x = cur.runner
            if cur.state != "running" or x is None or cur.killed is not None or cur.image != r.image:
                continue
            lane = self.presented.get(x)
            if lane and len(lane) >= DEPTH:
                continue
            before = lane[-1] if lane else cur
            big = before.res
            if (not r.spec.slots or before.spec.fid == r.spec.fid) and all(r.res[k] <= big[k] for k in RES):
                return x
        return None

    def _on_interpreter(self, ev: OnInterpreter):
        r = self.runs.get(ev.tid)
        if r is not None and r.state == "running":
            r.runner = ev.runner
            if self.queue:
                self._present_next()

    def _promote(self, runner):
        """`runner`'s task returned: the next one of its lane starts there now and holds resources
        from now on (a dropped one too, until it returns: the interpreter runs it anyway)."""
        self._release_ghost(runner)
        lane = self.presented.get(runner)
        if not lane:
            return
        nxt = lane.popleft()
        if not lane:
            del self.presented[runner]
        if self.runs.get(nxt.spec.id) is nxt and nxt.state == "presented":
            self._begin(nxt)
        else:
            self._hold(nxt, 1)
            # nobody wants its result any more, so nobody would stop it: a dropped task that runs
            # on and on must not hold a core for ever (its interpreter is killed, see _tick)
            nxt.deadline = self._now + GHOST_LIMIT
            self.ghosts[runner] = nxt

    def _release_ghost(self, runner):
        g = self.ghosts.pop(runner, None)
        if g is not None:
            self._hold(g, -1)

    def _hold(self, r, sign):
        """A dropped task's turn on its interpreter: its resources held (1) or freed (-1)."""
        for k in RES:
            self.used[k] += sign * r.res[k]
        if r.spec.slots:
            self.lib_running[r.spec.fid] = self.lib_running.get(r.spec.fid, 0) + sign

    def _unpresent(self, runner):
        """`runner` is gone: the tasks presented to it never started; queue them again, first, in
        their order (the dropped ones are forgotten)."""
        self._release_ghost(runner)
        lane = [r for r in self.presented.pop(runner, ()) if self.runs.get(r.spec.id) is r and r.state == "presented"]
        for nxt in lane:
            nxt.state, nxt.runner = "queued", None
            self._out.append(Requeued(nxt.spec.id))
        self.queue.extendleft(reversed(lane))

    def _start_failed(self, ev: StartFailed):
        r = self.runs.get(ev.tid)
        if r is None:
            return
        if r.state == "presented":
            lane = self.presented.get(r.runner)
            if lane and r in lane:
                lane.remove(r)
                if not lane:
                    del self.presented[r.runner]
            r.runner = None
        self._report(r, "failed", ev.reason, worker_fault=ev.worker_fault)

    # ---------------------------------------------------------------- ends
    def _task_finished(self, ev: TaskFinished):
        r = self.runs.get(ev.tid)
        if r is None or r.state != "running":
            if ev.runner is not None:   # a dropped task returned: its interpreter moves on
                self._promote(ev.runner)
                self._start_queued()    # (what it held is free)
            return
        kw = dict(exit_code=ev.exit_code, signal=ev.signal, stdout=ev.stdout)
        if r.killed:
            return self._report(r, *r.killed, **kw)
        if ev.exhausted:                # went over between samples (or before the first)
            r.exhausted = ev.exhausted
            return self._report(r, "resource exhaustion", exhausted_reason(ev.exhausted), **kw)
        if r.spec.python:
            reason, failed = ev.error, ev.error is not None
        else:
            code = ev.exit_code
            failed = bool(code)
            if ev.signal:
                reason = "killed by %s" % ev.signal
            elif code == 127:
                reason = "command not found (exit code 127)"
            else:
                reason = "exit code %d" % code if code else None
        self._report(r, "failed" if failed else "success", reason, collect=True, result=ev.result, sent=ev.sent, **kw)

    def starts_now(self, spec):
        """(devices,) when a task received now would start at once on an interpreter -- a Python
        task without files whose function is here, nothing queued, room for it, no GPUs, a free
        slot of its library -- else None (it goes the usual way, which may start it too).  The
        loop then sends it to an idle interpreter before handing it to this machine, whose
        StartTask for it follows (see Loop._on_task)."""
        if (spec.cmd is not None or spec.inputs or spec.outputs or spec.watch or spec.error or self.queue
                or spec.id in self.runs or spec.fid not in self.fns or spec.res["gpus"]):
            return None
        if not self._fits(spec.res) or self._slots_full(spec):
            return None
        return (self.no_gpus,)

    def plain_end(self, tid, runner):
        """The Run of a Python task that just returned on `runner`, if its end will be reported
        as it is -- success, or failure with the function's error -- and nothing rides on its
        result: running, not being stopped, without files, no task presented behind it nor
        queued here (whose start would ride on it).  Else None.  (The loop sends such a result
        before handing the end to this machine: see Loop._results_now.)"""
        r = self.runs.get(tid)
        if (r is None or r.state != "running" or r.killed is not None or runner is None or r.runner is not runner
                or self.queue or r.spec.inputs or r.spec.outputs or r.spec.watch or self.presented.get(runner)):
            return None
        return r

    def _interpreter_died(self, ev: InterpreterDied):
        self._unpresent(ev.runner)
        r = self.runs.get(ev.tid) if ev.tid is not None else None
        if r is None or r.state != "running":
            return self._start_queued()        # what was presented to it may start elsewhere
        if r.killed:
            return self._report(r, *r.killed)
        self._report(r, "failed", "the Python interpreter running the task died (%s)" % ev.why)

    def _exhausted(self, ev: Exhausted):
        r = self.runs.get(ev.tid)
        if r is not None and r.state == "running" and r.killed is None:
            r.exhausted = ev.exhausted
            self._kill(r, "resource exhaustion", exhausted_reason(ev.exhausted))

    def _tick(self, ev: Tick):
        now = self._now
        for r in list(self.runs.values()):
            if r.deadline is not None and now >= r.deadline and r.state == "running" and r.killed is None:
                # over its time allocation: resource exhaustion, naming the resource and by how much
                r.exhausted = {"resource": "time", "used": round(now - r.started, 1), "allocated": r.spec.time_max}
                self._kill(r, "resource exhaustion", exhausted_reason(r.exhausted))
        for g in self.ghosts.values():
            if now >= g.deadline:
                g.deadline = float("inf")     # asked once: its interpreter's death releases it
                self._out.append(KillTask(g.spec.id))

    def _kill(self, r, status, reason):
        """Stop a running task and report it as `status` when it is gone."""
        r.killed = (status, reason)
        self._out.append(KillTask(r.spec.id))

    def _kill_requested(self, ev: KillRequested):
        r = self.runs.get(ev.tid)
        if r is not None:
            self._end(r, None)

    def _report(self, r, status, reason, **kw):
        wall = self._now - r.started if r.started is not None else 0.0
        self._end(r, SendResult(r.spec.id, status, reason, wall, exhausted=r.exhausted, att=r.spec.att, **kw))

    def _end(self, r, result, restart=True):
        """The one way a task leaves: reported (`result`) or dropped (None: the manager no longer
        wants it). Frees what it held, lets the interpreter move on, drops its cache references."""
        if self.runs.get(r.spec.id) is not r:
            return
        del self.runs[r.spec.id]
        was, r.state = r.state, "done"
        if was == "running":
            for k in RES:
                self.used[k] -= r.res[k]
            self.gpu_free.extend(r.gpus)
            r.gpus = ()
            if r.spec.slots:
                self.lib_running[r.spec.fid] -= 1
        if result is not None:
            self._out.append(result)
            if r.runner is not None:
                self._promote(r.runner)
        elif was == "presented":
            # its interpreter runs it in its turn anyway: it stays in the lane (see _promote),
            # and the result it brings back is dropped
            self._out.append(DropTask(r.spec.id, stop=False))
        else:
            if was == "running" and r.runner is not None:
                self._unpresent(r.runner)      # its interpreter is killed with it
            self._out.append(DropTask(r.spec.id, stop=was == "running"))
        for i in r.spec.inputs:
            self._unref(i.cachename, i.level)
        if restart:
            self._start_queued()

    # ---------------------------------------------------------------- cache references
    def _unref(self, n, level):
        k = self.refs.get(n, 0) - 1
        if k > 0:
            self.refs[n] = k
            return
        self.refs.pop(n, None)
        if level == "task" and self.files.get(n) == "task":
            self._unlink(n)

    def _unlink(self, n):
        if self.refs.get(n):
            return        # a task still uses it; the manager's view catches up when it ends
        self.files.pop(n, None)
        self._out.append(Unlink(n))

    def _session_ended(self, ev: SessionEnded):
        for r in list(self.runs.values()):
            self._end(r, None, restart=False)
        self.queue.clear()
        self.presented.clear()
        self.ghosts.clear()
        self.starts.clear()        # the next manager knows nothing of these tasks
        self.start_att.clear()
        self.used = dict.fromkeys(RES, 0)
        self.gpu_free = list(self.gpu_ids)
        self.lib_running.clear()
        self.refs.clear()
        for n, level in list(self.files.items()):
            if level != "worker":
                self._unlink(n)
        self.put_errors.clear()
        self.spoiled.clear()
        self.fns.clear()
        self.pending = {k: v for k, v in self.pending.items() if k[0] != "peer"}

    _HANDLERS = {
        TaskReceived: _task_received, FunctionReceived: _function_received, FileStored: _file_stored,
        FileFailed: _file_failed, InputSpoiled: _input_spoiled, UnlinkRequested: _unlink_requested, InputReady: _input_ready,
        InputFailed: _input_failed, OnInterpreter: _on_interpreter, StartFailed: _start_failed,
        TaskFinished: _task_finished, InterpreterDied: _interpreter_died, Exhausted: _exhausted,
        KillRequested: _kill_requested, Tick: _tick, SessionEnded: _session_ended,
        FetchRequested: _fetch_requested, PeerFetched: _peer_fetched,
    }
