"""Carrying out the state machine's task commands: sandboxes, command processes, Python
interpreters, measuring, collecting outputs, the result message.

Every method that learns something returns the events for the state machine (events.py);
decisions (what to start, when to kill, what a task's status is) are state.py's.
"""
from __future__ import annotations

import logging
import os
import selectors
import stat
import tarfile
import tempfile
import time

from ..comm import file_chunks
from ..protocol.wire import MAX_CTL, fit_text
from . import monitor, orphans, seal
from .events import (Exhausted, FileStored, InputSpoiled, InterpreterDied, OnInterpreter, PresentTask,
                     StartFailed, TaskFinished)
from .monitor import Monitor
from .process import CommandProcess
from .sandbox import Sandbox, SandboxError

log = logging.getLogger("vinehpc.worker")


WATCH_INTERVAL = 1.0        # how often watched outputs are looked at
WATCH_CHUNK = 1 << 20       # most bytes of one watched output sent per look (the rest at the next)
STDOUT_BUDGET = MAX_CTL // 2  # a result's captured output, JSON-escaped: the other half is the rest of the result
SWEEP_INTERVAL = 1.0        # how often left-over processes are looked for...
SWEEP_FOR = 10.0            # ...for this long after a task ended (orphans are reparented as their parents die)


class Handle:
    """What carries out one started (or presented) task."""
    __slots__ = ("spec", "sandbox", "proc", "runner", "mon", "watched", "taken", "image")

    def __init__(self, spec):
        self.spec = spec
        self.sandbox = self.proc = self.runner = self.mon = None
        self.watched = dict.fromkeys(spec.watch, 0)    # watched output -> bytes already sent
        self.taken = []            # cache entries it got (Cache.take), given back when it ends
        self.image = None          # the root of the image it runs in


def _final(mon, payload) -> None:
    """Monitor `mon` ended with what an interpreter reported of its task (`payload`, as
    pool.readable gives it: result, error, stdout, wall, cpu, then rss, read, written when measured)."""
    rss, rd, wr = (tuple(payload[5:8]) + (None, None, None))[:3]
    mon.final(py={"wall": payload[3], "cpu": payload[4], "rss": rss, "read": rd, "written": wr})


def _of_attempt(h, **ctl) -> dict:
    """A message's control part about task handle h's attempt: its id, and its att when the task
    was sent again (the manager takes nothing of an attempt killed on this worker for the next)."""
    ctl["id"] = h.spec.id
    if h.spec.att:
        ctl["att"] = h.spec.att
    return ctl


class Execution:
    def __init__(self, sel, pool, cache, guard, *, workdir, hostname, default_image=None):
        self.sel = sel
        self.pool = pool
        self.cache = cache
        self.guard = guard
        self.workdir = workdir
        self.sandboxes = os.path.join(workdir, "tasks")
        os.makedirs(self.sandboxes, exist_ok=True)
        self.hostname = hostname
        self.default_image = default_image   # --image: every task without its own image runs in this one
        self.images = {}           # image cache name -> unpacked LocalEnv (sysimage_tools.deploy)
        self.image_seals = {}      # image root -> seal.Seal (an image is checked as inputs are)
        self.image_used = set()    # roots a task ran in since they were last checked
        self.fns = {}              # fid -> the function's bytes
        self.task_env = {}         # variables every task gets (the tunnel's proxy settings)
        self.handles = {}          # tid -> Handle
        self.prestarted = {}       # tid -> the interpreter it was sent to before its StartTask (prestart)
        self.next_sample = 0.0     # when running tasks are next measured
        self.next_watch = 0.0      # when watched outputs are next looked at
        self.watching = set()      # tids of handles with watched outputs (none: no look at all)
        self.table_error = None    # why the process table cannot be read (memory limits not enforced)
        self.conn = None           # the manager's connection (the loop's)
        self.next_sweep = 0.0      # when orphans of ended tasks are next looked for (orphans.py)...
        self.sweep_until = 0.0     # ...until then

    # ---------------------------------------------------------------- start
    def start(self, c) -> list:
        """StartTask or PresentTask."""
        spec = c.spec
        after = c.runner if isinstance(c, PresentTask) else None
        h = self.handles[spec.id] = Handle(spec)
        if h.watched:
            self.watching.add(spec.id)
        try:
            if spec.needs_sandbox:
                h.sandbox = Sandbox(self.sandboxes, spec.id)
                for i in spec.inputs:
                    if i.kind != "image":
                        sealed, why = self.cache.take(i.cachename)
                        if why is not None:      # the manager requeues the task when it hears of it
                            return [self._drop(i.cachename, why)] + self._start_failed(spec.id, why, True)
                        h.taken.append((i.cachename, sealed))
                        h.sandbox.link(self.cache.path(i.cachename), i.remote)
            image = self.images.get(c.image) if c.image else self.default_image
            if image is not None:
                image = self._image_checked(c.image, image)
                h.image = image.root
                why = image.python_mismatch()
                if why:
                    return self._start_failed(spec.id, why)
            box = h.sandbox.path if h.sandbox else None
            if spec.cmd is not None:
                env = dict(self._env(spec), VINEHPC_TASK=str(spec.id))   # whose its orphans are (orphans.py)
                if c.devices is not None:
                    env = dict(env, CUDA_VISIBLE_DEVICES=c.devices)
                if image is not None:
                    env = image.env_for(dict(os.environ, **env))
                h.proc = CommandProcess(spec.cmd, box, env, replace=image is not None)
                h.mon = Monitor(box=box)
                h.mon.attach(h.proc.pid)
                self.guard.add(h.proc.pid)
                self.sel.register(h.proc.fileno(), selectors.EVENT_READ, ("proc", h))
                self.sel.register(h.proc.out_fd, selectors.EVENT_READ, ("out", h))
                return []
            runner = self.prestarted.pop(spec.id, None)
            if isinstance(runner, OSError):
                raise runner
            h.runner = runner if runner is not None else self.pool.run(
                spec.id, spec.fid, self.fns[spec.fid], c.args, box, self._env(spec), after=after, image=image,
                devices=c.devices)
            h.mon = Monitor(box=box, py=True)
            h.mon.attach(h.runner.proc.pid)
            return [OnInterpreter(spec.id, h.runner)] if after is None else []
        except SandboxError as e:
            return self._start_failed(spec.id, "sandbox: %s" % e)
        except OSError as e:   # disk full, no processes left...: this worker's problem, not the task's
            return self._start_failed(spec.id, "cannot start the task on %s: %s" % (self.hostname, e), True)

    def prestart(self, spec, args, devices) -> bool:
        """Send a Python task without files to an idle interpreter now (WorkerState.starts_now
        said the StartTask for it follows: start() then takes this interpreter, or raises what
        sending to it raised).  False, nothing done, where it would run in an image."""
        if self.default_image is not None:
            return False
        try:
            self.prestarted[spec.id] = self.pool.run(spec.id, spec.fid, self.fns[spec.fid], args, None,
                                                     self._env(spec), devices=devices)
        except OSError as e:
            self.prestarted[spec.id] = e
        return True

    def _env(self, spec):
        return dict(self.task_env, **spec.env) if self.task_env else spec.env

    def _image_checked(self, n, env):
        """`env`, unpacked again if a task modified it since it was last checked (read-only, but
        `chmod u+w` undoes that).  Checked only after a task ran in it: one lstat per file."""
        s = self.image_seals.get(env.root)
        if s is not None and env.root in self.image_used:
            self.image_used.discard(env.root)
            if not seal.intact(s, env.root):
                if os.stat(env.root).st_ino != s.root_ino:
                    s = None           # unpacked again by another worker on this node: trust that one
                else:
                    log.warning("image %s was modified by a task: unpacking it again", env.root)
                    from sysimage_tools.deploy import ensure_local, remove_tree
                    remove_tree(env.root)
                    try:
                        env = ensure_local(env.manifest.path, env.id)
                    except Exception as e:     # ImageError, DeployError: this worker cannot run it now
                        raise OSError("cannot unpack image %s again: %s" % (env.manifest.path, e)) from None
                    if n is None:
                        self.default_image = env
                    else:
                        self.images[n] = env
                    s = None
        if s is None:
            s = self.image_seals[env.root] = seal.seal(env.root)
            s.root_ino = os.stat(env.root).st_ino
        seal.settle(s, env.root)
        return env

    def _start_failed(self, tid, reason, worker_fault=False):
        return self.forget(tid) + [StartFailed(tid, reason, worker_fault)]

    # ---------------------------------------------------------------- stop
    def kill(self, tid) -> None:
        """SIGKILL what runs the task: its pidfd or its interpreter's socket then reports the end
        (a task dropped while presented has no handle: its interpreter still runs it)."""
        h = self.handles.get(tid)
        if h is None:
            r = next((r for r in self.pool.runners if r.tid == tid), None)
            if r is not None:
                self.pool.kill(r)
            return
        if h.proc is not None:
            h.proc.kill()
        elif h.runner is not None:
            self.pool.kill(h.runner)

    def forget(self, tid, stop=False) -> list:
        """Drop a task's handle and sandbox; stop: kill and reap what runs it first.  Returns
        InputSpoiled for inputs it modified."""
        h = self.handles.pop(tid, None)
        self.watching.discard(tid)
        if h is None:
            return []
        if stop and h.proc is not None:
            h.proc.kill()
            self._unregister(h.proc.fileno())
            if h.proc.out_fd is not None:
                self._unregister(h.proc.out_fd)
            h.proc.reap()
            h.proc.output()
        elif stop and h.runner is not None:
            self.pool.abandon(h.runner)
        if h.sandbox is not None:
            h.sandbox.remove()
        return [self._drop(n, why) for n, _, why in self._give_back(h)]

    def _drop(self, n, why, tell=True) -> InputSpoiled:
        """A modified cache entry goes, and the manager hears it (tell; else the caller tells it):
        it requeues the tasks here that need it, blaming nobody, and sends it again with the next."""
        log.warning("%s: dropped", why)
        self.cache.remove(n)
        if tell:
            self._tell_dropped(n, why)
        return InputSpoiled(n, why)

    def _tell_dropped(self, n, why):
        if self.conn is not None and not self.conn.closed:
            self.conn.send("error", {"cn": n, "reason": why})

    def _give_back(self, h) -> list:
        """(cache name, modified by this task alone, why) of each input the task modified (its
        image is checked before the next task in it starts)."""
        if h.image is not None:
            self.image_used.add(h.image)
        out = []
        for n, sealed in h.taken:
            verdict = self.cache.give_back(n, sealed)
            if verdict is not None:
                out.append((n,) + verdict)
        h.taken = []
        return out

    def _unregister(self, fd):
        try:
            self.sel.unregister(fd)
        except (KeyError, ValueError):
            pass

    # ---------------------------------------------------------------- what the selector reports
    def proc_output(self, h) -> None:
        fd = h.proc.out_fd
        if fd is not None and not h.proc.drain():
            self._unregister(fd)

    def proc_exited(self, h) -> list:
        self._unregister(h.proc.fileno())
        code, sig = h.proc.reap()
        if h.proc.out_fd is not None:
            self._unregister(h.proc.out_fd)
        out = h.proc.output()
        if self.handles.get(h.spec.id) is not h:
            return []
        h.mon.final(rusage=h.proc.rusage)
        return [TaskFinished(h.spec.id, exit_code=code, signal=sig, stdout=out, exhausted=h.mon.over(h.spec.res))]

    def runner_readable(self, runner, items=None) -> list:
        """Events of what interpreter `runner` said (`items`: pool.readable's, read already)."""
        events = []
        for tid, payload in self.pool.readable(runner) if items is None else items:
            if payload is None:
                events.append(InterpreterDied(tid, runner, self.pool.last_death))
                continue
            result, error, stdout = payload[:3]
            h = self.handles.get(tid)
            x = None
            if h is not None:
                _final(h.mon, payload)
                x = h.mon.over(h.spec.res)
            events.append(TaskFinished(tid, stdout=stdout, result=result, error=error, runner=runner, exhausted=x))
        return events

    # ---------------------------------------------------------------- processes tasks left (orphans.py)
    def sweep_due(self, now):
        """Seconds until left-over processes should be looked for (None: no task ended lately)."""
        if now >= self.sweep_until:
            return None
        return max(0.0, self.next_sweep - now)

    def sweep(self, now, ended=False) -> None:
        """Kill what ended tasks left, once a second for SWEEP_FOR seconds after a task ended
        (ended: one just did).  Not at every task's end: reading /proc costs 20 us natively, 300
        under gVisor -- a quarter of a short command's cost there; a daemon lives a second longer."""
        if ended:
            self.sweep_until = now + SWEEP_FOR
            return
        if now < self.next_sweep or now >= self.sweep_until:
            return
        self.next_sweep = now + SWEEP_INTERVAL
        own = {self.guard.proc.pid}
        own.update(r.proc.pid for r in self.pool.runners)
        own.update(h.proc.pid for h in self.handles.values() if h.proc is not None)
        n = orphans.sweep(own, {str(t) for t in self.handles})
        if n:
            log.info("killed %d process(es) left by ended tasks", n)

    # ---------------------------------------------------------------- measuring (monitor.py)
    def monitor_due(self, now, running):
        """Seconds until the next sample of the running tasks is due (None: nothing to sample)."""
        if not running:
            return None
        oldest = min(r.started for r in running)
        return max(self.next_sample, oldest + monitor.MIN_AGE) - now

    def sample(self, now, running) -> list:
        """Measure the tasks that have run at least MIN_AGE seconds: Exhausted for any over its allocation."""
        if not running or now < self.next_sample:
            return []
        due = [h for h in (self.handles.get(r.spec.id) for r in running if now - r.started >= monitor.MIN_AGE)
               if h is not None and h.mon is not None and h.mon.root is not None]
        if not due:
            return []
        self.next_sample = now + monitor.INTERVAL
        try:
            table = monitor.proc_table()
            if self.table_error is not None:
                log.warning("the process table is readable again: memory limits are enforced")
                self.table_error = None
        except OSError as e:
            # measure what we can (disk) and say loudly that memory is not watched meanwhile
            if self.table_error is None:
                log.error("cannot read the process table (%s): memory limits are NOT enforced until it can be", e)
            self.table_error = str(e)
            table = {}
        out = []
        for h in due:
            h.mon.sample(table, now)
            x = h.mon.over(h.spec.res)
            if x is not None:
                out.append(Exhausted(h.spec.id, x))
        return out

    # ---------------------------------------------------------------- watched outputs
    def watch_due(self, now):
        """Seconds until watched outputs should be looked at, or None if no task has any."""
        if not self.watching:
            return None
        return max(0.0, self.next_watch - now)

    def stream_watched(self, now, conn) -> None:
        """Send what the watched outputs of started tasks gained since the last look (Task
        add_output(watch=True)): the manager appends it to its file as the task runs."""
        if not self.watching or now < self.next_watch:
            return
        self.next_watch = now + WATCH_INTERVAL
        for tid in self.watching:
            h = self.handles[tid]
            if h.sandbox is None:
                continue
            for remote, off in h.watched.items():
                data, off = _grown(h.sandbox, remote, off)
                if data:
                    conn.send("watch", _of_attempt(h, remote=remote, off=off), [data])
                    h.watched[remote] = off + len(data)

    # ---------------------------------------------------------------- the end
    def report(self, c, conn, started=None, started_att=None) -> list:
        """SendResult: collect outputs if the task ended on its own, clean up, send the result
        (with `started`: ids whose start was not told yet)."""
        h = self.handles.pop(c.tid, None)
        self.watching.discard(c.tid)
        if h is not None:
            self.sweep(time.monotonic(), ended=True)
        status, reason, temps, fault, value, events = c.status, c.reason, [], c.worker_fault, c.result, []
        code, later = c.exit_code, []
        for n, alone, why in self._give_back(h) if h is not None else ():
            # told after the result if this task alone had it: else the manager would requeue it
            events.append(self._drop(n, why, tell=not alone))
            if alone:
                later.append((n, why))
            value = code = None   # its outputs are not kept either; "failed", not a command that ran to its end
            if alone:      # it wrote to what every later task reads: its result is not trusted
                status, reason = "failed", "the task modified its input %r (inputs are read-only): %s" % (
                    next(i.remote for i in h.spec.inputs if i.cachename == n), why)
            else:          # several had it: this one may be honest; the manager requeues it
                status, reason, fault = "failed", why, True
        if c.collect and h is not None:
            status, reason, temps = self._collect(h, status, reason, conn)
        if h is not None and h.sandbox is not None:
            h.sandbox.remove()
        if not c.sent:
            self._send_result(conn, c.tid, status, reason, c.wall, value, h, code=code, signal=c.signal,
                              stdout=c.stdout, temps=temps, exhausted=c.exhausted, fault=fault, started=started,
                              started_att=started_att, att=c.att)
        for n, why in later:
            self._tell_dropped(n, why)
        return [FileStored(n, "workflow") for n in temps] + events

    def send_plain_result(self, conn, tid, error, stdout, result, wall, started=None, started_att=None,
                          att=None, h=None) -> None:
        """The result of a Python task without files that returned (WorkerState.plain_end), sent
        before the state machine hears of its end: the message report() would send for it (`h`:
        its handle, when not in `handles`: see measured_end)."""
        self._send_result(conn, tid, "failed" if error is not None else "success", error, wall, result,
                          h or self.handles.get(tid), stdout=stdout, started=started, started_att=started_att,
                          att=att)

    @staticmethod
    def measured_end(spec, payload) -> Handle:
        """A handle with the Monitor start() would give a Python task without files, ended with what
        its interpreter reported (`payload`, as pool.readable gives it): for a prestarted call whose
        result goes out before its start is in the books (Loop._deferred_results)."""
        h = Handle(spec)
        h.mon = Monitor(box=None, py=True)
        _final(h.mon, payload)
        return h

    def _send_result(self, conn, tid, status, reason, wall, value, h, *, code=None, signal=None, stdout=None,
                     temps=(), exhausted=None, fault=False, started=None, started_att=None, att=None):
        ctl = {"id": tid, "status": status, "wall": round(wall, 6)}
        if reason:
            ctl["reason"] = reason
        if code is not None:
            ctl["exit_code"] = code
        if signal:
            ctl["signal"] = signal
        if stdout:
            ctl["stdout"] = fit_text(stdout, STDOUT_BUDGET)
        if temps:
            ctl["temps"] = temps
            sums = self.cache.sums(temps)
            if sums:
                ctl["sums"] = sums
        if h is not None and h.mon is not None:
            ctl["measured"] = h.mon.measured(wall)
        if exhausted:
            ctl["exhausted"] = exhausted
        if fault:
            ctl["worker_fault"] = True     # the manager runs it elsewhere, without spending its retries
        if started:
            ctl["started"] = started
            if started_att:
                ctl["started_att"] = started_att
        if att is not None:
            ctl["att"] = att
        conn.send("result", ctl, [value] if value is not None else ())

    def _collect(self, h, status, reason, conn):
        """Outputs of a task that ended on its own: send files, keep temps in the cache."""
        temps = []
        files = []
        for o in h.spec.outputs:
            try:
                p = h.sandbox.existing(o.remote)
            except SandboxError as e:
                status, reason = "output missing", str(e)
                continue
            if p is None:
                if status == "success":
                    status, reason = "output missing", "the task did not create output %r" % o.remote
                continue
            if status != "success":
                continue    # a failed task's outputs are not installed
            inputs = [os.path.realpath(self.cache.path(i.cachename)) for i in h.spec.inputs]
            if o.kind == "temp":
                try:
                    h.sandbox.resolve(p, inputs, copy=True)
                    self.cache.adopt(o.cachename, p)   # adopt checks the name
                    temps.append(o.cachename)
                except SandboxError as e:
                    status, reason = "output missing", str(e)
                except (OSError, ValueError) as e:
                    status, reason = "output missing", "cannot keep temp output %r: %s" % (o.remote, e)
            else:
                try:   # never read through a link out of the sandbox (a link to ~/.ssh/id_rsa)
                    files.append((o.remote, self._open_output(h.sandbox.resolve(p, inputs))))
                except SandboxError as e:
                    status, reason = "output missing", str(e)
                except OSError as e:
                    status, reason = "output missing", "cannot read output %r: %s" % (o.remote, e)
        for remote, fh in files:
            ctl = _of_attempt(h, remote=remote, tar=getattr(fh, "is_tar", False))
            conn.send_stream(file_chunks(fh, "outfile", ctl))
        return status, reason, temps

    def _open_output(self, p):
        """An open file with the output's bytes; a directory travels as an (unlinked) tar."""
        if not os.path.isdir(p):
            return open(p, "rb")
        fh = tempfile.TemporaryFile(dir=self.workdir)
        with tarfile.open(fileobj=fh, mode="w", dereference=True) as tar:   # links to inputs become files
            tar.add(p, arcname=".")
        fh.seek(0)
        fh.is_tar = True
        return fh


def _grown(sandbox, remote: str, off: int):
    """(bytes of a plain file `remote` past `off`, the offset they start at); a file that shrank
    is sent again from 0.  Never follows a link: a task's link must not read the worker's files."""
    try:
        fd = os.open(sandbox.existing(remote) or "", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except (OSError, SandboxError):
        return b"", off
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size == off:
            return b"", off
        if st.st_size < off:
            off = 0
        return os.pread(fd, WATCH_CHUNK, off), off
    finally:
        os.close(fd)
