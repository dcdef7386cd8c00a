"""Running tasks on a worker: queue by resources, start in a sandbox (a command's process
group, or a Python interpreter), collect outputs, report; time limits, kills and pipelining.

The Worker (main.py) mixes this in; it provides the connection, cache, pool and selector.
"""
from __future__ import annotations

import os
import selectors
import tempfile
import time

from ..comm import file_chunks
from .cache import check_cachename
from . import monitor
from .monitor import Monitor
from .process import CommandProcess
from .sandbox import Sandbox, SandboxError

RES = ("cores", "memory", "disk", "gpus")


class Run:
    """One task on this worker."""
    __slots__ = ("id", "spec", "args", "res", "state", "sandbox", "proc", "runner", "started", "deadline",
                 "waiting_for", "killed", "image", "mon", "exhausted", "gpus")

    def __init__(self, spec, args):
        self.id = spec["id"]
        self.spec = spec
        self.args = args
        r = spec.get("res") or {}
        self.res = {k: int(r.get(k) or 0) for k in RES}
        self.state = "new"
        self.sandbox = self.proc = self.runner = None
        self.started = None
        self.deadline = None
        self.waiting_for = set()
        self.killed = None
        self.image = None      # cache name of its environment image
        self.mon = None        # its Monitor once it starts (monitor.py)
        self.exhausted = None  # {"resource", "used", "allocated"} if it went over its allocation
        self.gpus = ()         # the device ids it holds while it runs


class Running:
    """Task execution for the Worker (a mixin: it uses the Worker's state)."""

    def _enqueue(self, r):
        r.state = "queued"
        self.queue.append(r)
        self._start_queued()

    def _fits(self, r):
        for k in RES:
            if r.res[k] and self.used[k] + r.res[k] > self.total[k] and self.used[k] > 0:
                return False
        return True

    def _start_queued(self):
        q = self.queue
        blocked = []
        while q:
            r = q.popleft()
            if r.state != "queued":
                continue
            if not self._fits(r):
                blocked.append(r)
                continue
            self._start(r)
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
        r.state = "running"
        r.started = time.monotonic()
        if r.mon is None:
            r.mon = Monitor(r.started)
        else:
            r.mon.started = r.started
        self.active[r.id] = r
        tm = r.spec.get("time_max")
        r.deadline = r.started + float(tm) if tm else None

    def _start(self, r, runner=None):
        """Start r now, or, with `runner`, hand it to that busy interpreter to run next."""
        if runner is None:
            self._begin(r)
        else:
            r.state = "presented"
        spec = r.spec
        try:
            needs_box = spec.get("cmd") is not None or spec.get("inputs") or spec.get("outputs")
            if needs_box:
                r.sandbox = Sandbox(self.sandboxes, r.id)
                for n, remote, kind, level, url in spec.get("inputs", ()):
                    if kind != "image":
                        r.sandbox.link(self.cache.path(n), remote)
            env = spec.get("env") or {}
            if self.task_env:
                env = dict(self.task_env, **env)
            # only the GPUs it holds; none for a task that asked for none (on a worker with GPUs)
            devices = ",".join(r.gpus) if r.res["gpus"] else ("" if self.gpu_ids else None)
            image = self.images.get(r.image) if r.image else self.default_image
            if image is not None:
                why = image.python_mismatch()
                if why:
                    return self._finish(r, "failed", why)
            if spec.get("cmd") is not None:
                if devices is not None:
                    env = dict(env, CUDA_VISIBLE_DEVICES=devices)
                if image is not None:
                    env = image.env_for(dict(os.environ, **env))
                r.proc = CommandProcess(spec["cmd"], r.sandbox.path, env, replace=image is not None)
                r.mon.box = r.sandbox.path
                r.mon.attach(r.proc.pid)
                self.guard.add(r.proc.pid)
                self.sel.register(r.proc.fileno(), selectors.EVENT_READ, ("proc", r))
                self.sel.register(r.proc.out_fd, selectors.EVENT_READ, ("out", r))
            else:
                fid = spec["fid"]
                r.runner = self.pool.run(r.id, fid, self.fns[fid], r.args, r.sandbox.path if r.sandbox else None, env,
                                         after=runner, image=image, devices=devices)
                if runner is not None:
                    self.presented[runner] = r
                if r.mon is None:
                    r.mon = Monitor(None)
                r.mon.py = True
                r.mon.box = r.sandbox.path if r.sandbox else None
                r.mon.attach(r.runner.proc.pid)
        except SandboxError as e:
            self._finish(r, "failed", "sandbox: %s" % e)
        except OSError as e:   # disk full, no processes left...: this worker's problem, not the task's
            self._finish(r, "failed", "cannot start the task on %s: %s" % (self.hostname, e), worker_fault=True)

    def _present_next(self):
        """Pipelining: give a busy interpreter the next short Python task now, so it starts it the
        moment the current one returns instead of waiting a round trip through this loop."""
        q = self.queue
        while q and q[0].state != "queued":
            q.popleft()
        if not q:
            return
        r = q[0]
        if not r.spec.get("pipe") or r.spec.get("cmd") is not None or r.res["gpus"]:
            return
        for runner, tid in self.pool.busy():
            cur = self.runs.get(tid)
            if (cur is not None and runner not in self.presented and cur.image == r.image
                    and all(r.res[k] <= cur.res[k] for k in RES)):
                q.popleft()
                self._start(r, runner)
                return

    def _proc_output(self, r):
        fd = r.proc.out_fd
        if fd is not None and not r.proc.drain():
            self._unregister(fd)

    def _unregister(self, fd):
        try:
            self.sel.unregister(fd)
        except (KeyError, ValueError):
            pass

    def _proc_exited(self, r):
        self._unregister(r.proc.fileno())
        code, sig = r.proc.reap()
        if r.proc.out_fd is not None:
            self._unregister(r.proc.out_fd)
        out = r.proc.output()
        if self.runs.get(r.id) is not r:
            return
        if r.mon is not None:
            r.mon.final(rusage=r.proc.rusage)
        if r.killed:
            return self._finish(r, r.killed[0], r.killed[1], exit_code=code, stdout=out, signal=sig)
        if r.mon is not None and self._over(r):    # went over between samples (or before the first)
            return self._finish(r, "resource exhaustion", r.killed[1], exit_code=code, stdout=out, signal=sig)
        if sig:
            reason = "killed by %s" % sig
        elif code == 127:
            reason = "command not found (exit code 127)"
        elif code:
            reason = "exit code %d" % code
        else:
            reason = None
        self._collect(r, code, out, reason, signal=sig, failed=bool(code))

    def _unpresent(self, runner):
        """`runner` is gone: the task it was to run next never started; queue it again here."""
        nxt = self.presented.pop(runner, None)
        if nxt is not None and self.runs.get(nxt.id) is nxt:
            nxt.state, nxt.runner = "queued", None
            if nxt.sandbox is not None:
                nxt.sandbox.remove()
                nxt.sandbox = None
            self.queue.appendleft(nxt)

    def _py_done(self, tid, payload, runner=None):
        if payload is None:
            self._unpresent(runner)
        r = self.runs.get(tid)
        if r is None:
            self._promote(runner)
            return
        if payload is None:   # the interpreter died under the task
            if r.killed:
                return self._finish(r, r.killed[0], r.killed[1])
            return self._finish(r, "failed", "the Python interpreter running the task died (%s)"
                                % self.pool.last_death)
        result, error, stdout, wall, cpu = payload[:5]
        rss, rd, wr = (tuple(payload[5:8]) + (None, None, None))[:3]
        if r.mon is not None:
            r.mon.final(py={"wall": wall, "cpu": cpu, "rss": rss, "read": rd, "written": wr})
            if self._over(r):
                return self._finish(r, "resource exhaustion", r.killed[1], stdout=stdout)
        r.args = result
        self._collect(r, None, stdout, error, py=True, failed=error is not None)

    # ---------------------------------------------------------------- monitoring (monitor.py)
    def _over(self, r) -> bool:
        """Has r gone over a memory or disk allocation it asked for? (r.exhausted, r.killed set)"""
        x = r.mon.over(r.res)
        if x is None:
            return False
        r.exhausted = x
        r.killed = ("resource exhaustion", monitor.exhausted_reason(x))
        return True

    def _monitor_due(self, now):
        """Seconds until the next sample of running tasks is due (None: no task to sample)."""
        if not self.active:
            return None
        oldest = min(r.started for r in self.active.values())
        return max(self.next_sample, oldest + monitor.MIN_AGE) - now

    def _sample(self, now):
        """Measure the tasks that have run at least MIN_AGE seconds; kill any over its allocation."""
        if not self.active or now < self.next_sample:
            return
        due = [r for r in self.active.values() if r.state == "running" and r.killed is None
               and now - r.started >= monitor.MIN_AGE and r.mon.root is not None]
        if not due:
            return
        self.next_sample = now + monitor.INTERVAL
        try:
            table = monitor.proc_table()
        except Exception:
            return
        for r in due:
            r.mon.sample(table, now)
            if self._over(r):
                status, reason = r.killed
                r.killed = None
                self._kill(r, status, reason)

    def _promote(self, runner):
        """The task presented to `runner` has started there: it holds resources from now on."""
        nxt = self.presented.pop(runner, None)
        if nxt is not None and self.runs.get(nxt.id) is nxt and nxt.state == "presented":
            self._begin(nxt)

    def _collect(self, r, code, stdout, reason, signal=None, measured=None, py=False, failed=False):
        """Outputs of a task that ended on its own: send files, adopt temps, report."""
        status = "failed" if failed else "success"
        temps = []
        files = []
        for remote, kind, n in r.spec.get("outputs", ()):
            try:
                p = r.sandbox.existing(remote)
            except SandboxError as e:
                status, reason = "output missing", str(e)
                continue
            if p is None:
                if status == "success":
                    status, reason = "output missing", "the task did not create output %r" % remote
                continue
            if status != "success":
                continue    # a failed task's outputs are not installed
            if kind == "temp":
                try:
                    self.cache.adopt(check_cachename(n), p)
                    temps.append(n)
                except (OSError, ValueError) as e:
                    status, reason = "output missing", "cannot keep temp output %r: %s" % (remote, e)
            else:
                try:
                    files.append((remote, self._open_output(p)))
                except OSError as e:
                    status, reason = "output missing", "cannot read output %r: %s" % (remote, e)
        for remote, fh in files:
            self.conn.send_stream(file_chunks(fh, "outfile", {"id": r.id, "remote": remote,
                                                           "tar": getattr(fh, "is_tar", False)}))
        self._finish(r, status, reason, exit_code=code, stdout=stdout, temps=temps, measured=measured,
                     signal=signal, result_frame=r.args if py else None)

    def _open_output(self, p):
        """An open file with the output's bytes; a directory travels as an (unlinked) tar."""
        if not os.path.isdir(p):
            return open(p, "rb")
        import tarfile
        fh = tempfile.TemporaryFile(dir=self.workdir)
        with tarfile.open(fileobj=fh, mode="w", dereference=True) as tar:   # links to inputs become files
            tar.add(p, arcname=".")
        fh.seek(0)
        fh.is_tar = True
        return fh

    def _finish(self, r, status, reason, exit_code=None, stdout=None, temps=(), measured=None, signal=None,
                result_frame=None, worker_fault=False):
        if self.runs.pop(r.id, None) is None:
            return
        self.active.pop(r.id, None)
        wall = time.monotonic() - r.started if r.started else 0.0
        if r.state == "running":
            for k in RES:
                self.used[k] -= r.res[k]
            self._release_gpus(r)
        r.state = "done"
        if r.runner is not None:
            self._promote(r.runner)
        for n, remote, kind, level, url in r.spec.get("inputs", ()):
            self.cache.unref(n, level)
        if r.sandbox is not None:
            r.sandbox.remove()
        ctl = {"id": r.id, "status": status, "wall": round(wall, 6)}
        if reason:
            ctl["reason"] = reason
        if exit_code is not None:
            ctl["exit_code"] = exit_code
        if signal:
            ctl["signal"] = signal
        if stdout:
            ctl["stdout"] = stdout
        if temps:
            ctl["temps"] = temps
        if r.mon is not None:
            try:
                measured = dict(r.mon.measured(wall), **(measured or {}))
            except Exception:
                pass
        if measured:
            ctl["measured"] = measured
        if r.exhausted:
            ctl["exhausted"] = r.exhausted
        if worker_fault:
            ctl["worker_fault"] = True     # the manager runs it elsewhere, without spending its retries
        if self.conn is not None:
            self.conn.send("result", ctl, [result_frame] if result_frame is not None else ())
        self._start_queued()

    def _release_gpus(self, r):
        if r.gpus:
            self.gpu_free.extend(r.gpus)
            r.gpus = ()

    def _kill(self, r, status, reason):
        """Stop a running task and report it as `status`."""
        r.killed = (status, reason)
        if r.proc is not None:
            r.proc.kill()        # the pidfd fires and _proc_exited reports it
        elif r.runner is not None:
            self.pool.kill(r.runner)   # the runner socket closes and _py_done(None) reports it
        else:
            self._finish(r, status, reason)

    def _abort(self, r):
        """Stop a task the manager no longer wants: no result is sent."""
        self.runs.pop(r.id, None)
        self.active.pop(r.id, None)
        if r.state == "running":
            for k in RES:
                self.used[k] -= r.res[k]
            self._release_gpus(r)
        was, r.state = r.state, "done"
        if r.proc is not None:
            r.proc.kill()
            self._unregister(r.proc.fileno())
            if r.proc.out_fd is not None:
                self._unregister(r.proc.out_fd)
            r.proc.reap()
            r.proc.output()
        elif was == "presented":
            self.presented.pop(r.runner, None)   # its interpreter runs it and we drop the result
        elif r.runner is not None:
            self._unpresent(r.runner)
            self.pool.abandon(r.runner)
        for n, remote, kind, level, url in r.spec.get("inputs", ()):
            self.cache.unref(n, level)
        if r.sandbox is not None:
            r.sandbox.remove()
        self._start_queued()
