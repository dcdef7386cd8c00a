"""The worker's decisions, with no I/O: `WorkerState.handle(event, now) -> [command]`.

Events and commands are the dataclasses of events.py; loop.py feeds the events in and carries
the commands out.  No sockets, processes, files or clock here: time comes in as `now`.

A task's life:  waiting (a URL fetch, an image unpack) -> queued (until cores, memory, disk
and gpus fit) -> running -> done.  A short Python task may skip the wait for resources:
it is *presented* to an interpreter busy with a task at least as large (pipelining), and
starts -- holds resources, its clock runs -- the moment that task returns.

Cache references: every input a waiting/queued/running task names is referenced; an entry
is unlinked only when nobody references it (task-level inputs: as soon as their last user
ends; others when the manager asks, or at the end of the workflow unless worker-level).
"""
from __future__ import annotations

import collections

from ..protocol import ProtocolError
from ..protocol.messages import RES
from .events import (DropTask, Exhausted, FetchURL, FileFailed, FileStored, FunctionReceived, InputFailed,
                     InputReady, InterpreterDied, KillRequested, KillTask, OnInterpreter, PresentTask, Requeued,
                     SendCached, SendResult, SessionEnded, StartFailed, StartTask, TaskFinished, TaskReceived,
                     Tick, Unlink, UnlinkRequested, UnpackImage)

ORDER = {"task": 0, "workflow": 1, "worker": 2}     # cache levels, weakest first


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
        self.files = {} if files is None else files
        self.refs = {}             # cache name -> waiting/queued/running tasks naming it
        self.put_errors = {}       # cache name -> (why it could not be stored, the worker's fault?)
        self.fns = set()           # function ids received
        self.images = set()        # environment images unpacked (kept across managers)
        self.pending = {}          # (what, cachename) -> [Run waiting for that background work]
        self.runs = {}             # tid -> Run
        self.queue = collections.deque()
        self.presented = {}        # busy interpreter -> the Run it starts next (None: that Run was dropped)
        self.used = dict.fromkeys(RES, 0)
        self.gpu_free = list(self.gpu_ids)
        self.lib_running = {}      # library fid -> its calls running (limited by their spec.slots)
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
        return min(ds) if ds else None

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
            elif i.kind == "url":
                self._wait(r, ("url", n), FetchURL(n, i.url))
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
            self._out.append(cmd)

    def _input_ready(self, ev: InputReady):
        if ev.what == "url":
            self.files[ev.cachename] = "workflow"
            self._out.append(SendCached(ev.cachename))
        else:
            self.images.add(ev.cachename)
        key = (ev.what, ev.cachename)
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

    def _file_failed(self, ev: FileFailed):
        self.put_errors[ev.cachename] = (ev.reason, ev.worker_fault)

    def _unlink_requested(self, ev: UnlinkRequested):
        self._unlink(ev.cachename)

    # ---------------------------------------------------------------- queue and start
    def _enqueue(self, r):
        r.state = "queued"
        self.queue.append(r)
        self._start_queued()

    def _fits(self, r) -> bool:
        # a task larger than the whole worker still runs, alone (the manager sized it)
        res, used, total = r.res, self.used, self.total
        for k in RES:      # a plain loop: this runs for every queued task on every start attempt
            n = res[k]
            if n and used[k] and used[k] + n > total[k]:
                return False
        return True

    def _start_queued(self):
        q = self.queue
        blocked = []
        while q:
            r = q.popleft()
            if r.state != "queued":
                continue
            if not self._fits(r) or (r.spec.slots and self.lib_running.get(r.spec.fid, 0) >= r.spec.slots):
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
        r.deadline = self._now + r.spec.time_max if r.spec.time_max else None

    def _devices(self, r):
        """Only the GPUs it holds; none for a task that asked for none (on a worker with GPUs)."""
        return ",".join(r.gpus) if r.res["gpus"] else ("" if self.gpu_ids else None)

    def _present_next(self):
        """Pipelining: give a busy interpreter the next short Python task now, so it starts it the
        moment the current one returns instead of waiting a round trip through the loop."""
        q = self.queue
        while q and q[0].state != "queued":
            q.popleft()
        if not q:
            return
        r = q[0]
        if not r.spec.pipe or not r.spec.python or r.res["gpus"]:
            return
        for cur in self.runs.values():
            x = cur.runner
            # (a call of a library with slots only takes over from a call of the same library: its
            # library's count of running calls stays the same)
            if (cur.state == "running" and x is not None and cur.killed is None and x not in self.presented
                    and cur.image == r.image and all(r.res[k] <= cur.res[k] for k in RES)
                    and (not r.spec.slots or cur.spec.fid == r.spec.fid)):
                q.popleft()
                r.state, r.runner = "presented", x
                self.presented[x] = r
                self._out.append(PresentTask(r.spec, r.args, self._devices(r), r.image, x))
                return

    def _on_interpreter(self, ev: OnInterpreter):
        r = self.runs.get(ev.tid)
        if r is not None and r.state == "running":
            r.runner = ev.runner
            if self.queue:
                self._present_next()

    def _promote(self, runner):
        """The task presented to `runner` starts there now: it holds resources from now on."""
        nxt = self.presented.pop(runner, None)
        if nxt is not None and self.runs.get(nxt.spec.id) is nxt and nxt.state == "presented":
            self._begin(nxt)

    def _unpresent(self, runner):
        """`runner` is gone: the task presented to it never started; queue it again, first."""
        nxt = self.presented.pop(runner, None)
        if nxt is not None and self.runs.get(nxt.spec.id) is nxt:
            nxt.state, nxt.runner = "queued", None
            self._out.append(Requeued(nxt.spec.id))
            self.queue.appendleft(nxt)

    def _start_failed(self, ev: StartFailed):
        r = self.runs.get(ev.tid)
        if r is None:
            return
        if r.state == "presented":
            if self.presented.get(r.runner) is r:
                del self.presented[r.runner]
            r.runner = None
        self._report(r, "failed", ev.reason, worker_fault=ev.worker_fault)

    # ---------------------------------------------------------------- ends
    def _task_finished(self, ev: TaskFinished):
        r = self.runs.get(ev.tid)
        if r is None or r.state != "running":
            if ev.runner is not None:   # a dropped task returned: its interpreter moves on
                self._promote(ev.runner)
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
        self._report(r, "failed" if failed else "success", reason, collect=True, result=ev.result, **kw)

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
        self._end(r, SendResult(r.spec.id, status, reason, wall, exhausted=r.exhausted, **kw))

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
            # its interpreter runs it after its current task: keep that interpreter taken,
            # and the result it brings back is dropped
            if self.presented.get(r.runner) is r:
                self.presented[r.runner] = None
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
        self.used = dict.fromkeys(RES, 0)
        self.gpu_free = list(self.gpu_ids)
        self.lib_running.clear()
        self.refs.clear()
        for n, level in list(self.files.items()):
            if level != "worker":
                self._unlink(n)
        self.put_errors.clear()
        self.fns.clear()

    _HANDLERS = {
        TaskReceived: _task_received, FunctionReceived: _function_received, FileStored: _file_stored,
        FileFailed: _file_failed, UnlinkRequested: _unlink_requested, InputReady: _input_ready,
        InputFailed: _input_failed, OnInterpreter: _on_interpreter, StartFailed: _start_failed,
        TaskFinished: _task_finished, InterpreterDied: _interpreter_died, Exhausted: _exhausted,
        KillRequested: _kill_requested, Tick: _tick, SessionEnded: _session_ended,
    }
