"""TaskVine's Manager methods that vinehpc's own Manager did not have (a mixin of Manager).

Each is written on the Manager's public machinery (submit, _call on the I/O thread, posting
core events), so a ported TaskVine script runs with only its import changed.  What TaskVine
does that vinehpc does not do yet is refused by name (NotImplementedError) or, for a tuning
knob, warned about -- never silently different.  See docs-pending/compat.md for the table.
"""
from __future__ import annotations

import os
import shutil
import tarfile
import threading
import urllib.request
import warnings

from .core.events import Cancel, SlowMultiplier, Undeclare
from .file import File
from .scheduler import make as make_policy, policy_name
from .task import Task, _positive


# Manager.tune(): TaskVine's names that vinehpc has a setting for, and those it has none for
TUNABLE = ("keepalive-interval", "keepalive-timeout", "disconnect-slow-workers-factor", "wait-for-workers",
           "max-worker-losses", "file-source-max-transfers", "worker-source-max-transfers")
# tune() names of the core's worker counts -> the Core attribute
CORE_COUNTS = {"wait-for-workers": "wait_for_workers", "max-worker-losses": "max_worker_losses"}
NOT_TUNABLE = ("attempt-schedule-depth", "category-steady-n-tasks", "default-transfer-rate", "hungry-minimum",
               "hungry-minimum-factor", "immediate-recovery", "long-timeout", "max-retrievals",
               "min-transfer-timeout", "monitor-interval", "prefer-dispatch", "proportional-resources",
               "proportional-whole-tasks", "ramp-down-heuristic", "resource-submit-multiplier", "short-timeout",
               "transfer-outlier-factor", "transfer-replica-per-cycle", "transfer-temps-recovery",
               "transient-error-interval", "wait-retrieve-many", "worker-retrievals",
               "temp-replica-count", "max-library-retries", "watch-library-logfiles")
FETCH_TIMEOUT = 300.0
HUNGRY_MINIMUM = 10     # hungry(): TaskVine's default "hungry-minimum"


def _cache_name(file, what):
    """The cache name of a declared file; None for a local file that does not exist (never sent)."""
    if not isinstance(file, File):
        raise TypeError("%s needs a file from Manager.declare_*(), got %r" % (what, file))
    if file.kind == "file" and not file.exists():
        return None
    return file.cachename()


class TaskVineAPI:
    """TaskVine's Manager methods on top of vinehpc's Manager (mixed into vinehpc.Manager)."""

    # ---------------------------------------------------------------- settings
    def set_name(self, name: str) -> None:
        """The project name (journal, stats, `vinehpc status`)."""
        self.name = _check_name(name)
        # through the I/O thread: the live figures (`vinehpc status`) follow the journal
        self._call(lambda: self._server.record({"event": "name", "name": self.name}))

    @property
    def peer_transfers(self) -> bool:
        return self.core.transfers.enabled

    def enable_peer_transfers(self) -> None:
        """Workers get inputs from workers that hold them (the default): a cached input
        (declare_file(..., cache=True) or "worker") and a temp another worker made travel between
        workers; the manager sends an input's first copy only.  See core/transfers.py."""
        self._call(lambda: setattr(self.core.transfers, "enabled", True))

    def disable_peer_transfers(self) -> None:
        """Every input from the manager; a temp another worker needs goes through the manager
        (transfers already on their way finish)."""
        self._call(lambda: setattr(self.core.transfers, "enabled", False))

    def set_file_source_max_transfers(self, n: int) -> None:
        """Transfers one source (a worker, or the manager) serves at once (default 3)."""
        n = int(n)
        if n < 1:
            raise ValueError("file_source_max_transfers must be at least 1, got %r" % n)
        self._call(lambda: setattr(self.core.transfers, "limit", n))

    set_worker_source_max_transfers = set_file_source_max_transfers

    def tune(self, name: str, value) -> int:
        """TaskVine's advanced settings: keepalive-interval, keepalive-timeout,
        disconnect-slow-workers-factor and wait-for-workers (dispatch nothing before that many
        workers joined) are vinehpc settings too (0 returned), and so is vinehpc's own
        max-worker-losses (a task running on that many different workers that were lost fails with
        result "max retries"; default 3, 0: never); TaskVine's other names have no
        vinehpc setting: warned about, -1 returned (TaskVine's failure code)."""
        if name in ("keepalive-interval", "keepalive-timeout"):
            v = _positive("%s (seconds)" % name, float(value))
            attr = "ka_interval" if name == "keepalive-interval" else "ka_timeout"
            self._call(lambda: setattr(self._server, attr, v))
            return 0
        if name == "disconnect-slow-workers-factor":
            # TaskVine: below 1 turns it off
            self._server.post(SlowMultiplier(None, float(value) if float(value) >= 1 else 0.0))
            return 0
        if name in ("file-source-max-transfers", "worker-source-max-transfers"):
            self.set_file_source_max_transfers(value)
            return 0
        if name in CORE_COUNTS:           # a number of workers the core keeps
            n = int(value)
            if n < 0:
                raise ValueError("%s must be a non-negative number of workers, got %r" % (name, value))
            self._call(lambda: setattr(self.core, CORE_COUNTS[name], n))
            return 0
        if name in NOT_TUNABLE:
            warnings.warn("Manager.tune(%r): vinehpc has no such setting; ignored (settings: %s)"
                          % (name, ", ".join(TUNABLE)), stacklevel=2)
            return -1
        raise ValueError("unknown tune() setting %r (vinehpc's: %s)" % (name, ", ".join(TUNABLE)))

    def set_scheduler(self, scheduler) -> None:
        """Which worker a task goes to among those it fits: "files" (most input bytes cached,
        the default; TaskVine's VINE_SCHEDULE_FILES) or "fcfs" (VINE_SCHEDULE_FCFS)."""
        policy = make_policy(policy_name(scheduler))
        self._call(lambda: setattr(self.core, "policy", policy))

    def set_keepalive_interval(self, interval) -> int:
        return self.tune("keepalive-interval", interval)

    def set_keepalive_timeout(self, timeout) -> int:
        return self.tune("keepalive-timeout", timeout)

    def enable_monitoring(self, watchdog=True, time_series=False) -> int:
        """Accepted: vinehpc always measures tasks (resources_measured) and enforces what they
        were given; there is no time series."""
        return 1

    def enable_disconnect_slow_workers_category(self, name: str, multiplier: float) -> None:
        self.enable_disconnect_slow_workers(multiplier if multiplier >= 1 else 0, category=name)

    def set_category_resources_max(self, category: str, rmd: dict) -> None:
        """TaskVine's name for set_category_max_resources (memory and disk, MB)."""
        if rmd:
            self.set_category_max_resources(category, rmd)

    def block_host_with_timeout(self, host: str, timeout: float) -> None:
        self.block_host(host, timeout if timeout >= 1 else 0)

    def log_txn_app(self, entry) -> None:
        """A line of the application's own in the run's journal (transactions.jsonl)."""
        self.journal.write({"event": "application", "entry": str(entry)})

    @property
    def logging_directory(self) -> str:
        return self.run_dir

    def hungry(self) -> int:
        """How many more tasks to submit now (0: enough are waiting): TaskVine's measure, enough
        waiting tasks to keep every connected core busy twice over, and at least HUNGRY_MINIMUM."""
        def count():
            cores = sum(w.total["cores"] for w in self.core.workers.values())
            return max(HUNGRY_MINIMUM, 2 * cores) - (len(self.core.tasks) - self.core.n_running)
        return max(0, self._call(count))

    # ---------------------------------------------------------------- waiting
    def wait_for_tag(self, tag, timeout=None) -> Task | None:
        """Like wait(), but only a task whose tag is `tag` (None: any task)."""
        tag = None if tag is None else str(tag)
        return self._wait(None if tag is None else (lambda t: t.tag == tag), timeout)

    def wait_for_task_id(self, task_id, timeout=None) -> Task | None:
        """Like wait(), but only the task `task_id` (-1: any task); None at once if that task is
        not outstanding (unknown, or already returned)."""
        if task_id == -1 or task_id is None:
            return self._wait(None, timeout)
        tid = int(task_id)
        if not self._call(lambda: tid in self.core.tasks or any(t.id == tid for t in self._server.handing())):
            with self._server.cond:
                if not any(t.id == tid for t in self._server.done):
                    return None
        return self._wait(lambda t: t.id == tid, timeout)

    # ---------------------------------------------------------------- cancelling
    def cancel_by_task_id(self, task_id) -> int:
        """Cancel one task: 1 if it was outstanding, else 0. It comes back with result "cancelled"."""
        return self._cancel_where(lambda t: t.id == task_id)

    def cancel_by_task_tag(self, tag) -> int:
        """Cancel the outstanding tasks tagged `tag`; returns how many."""
        tag = str(tag)
        return self._cancel_where(lambda t: t.tag == tag)

    def cancel_by_category(self, category) -> int:
        """Cancel the outstanding tasks of `category`; returns how many."""
        return self._cancel_where(lambda t: t.category == category)

    def cancel_all(self) -> int:
        """Cancel every outstanding task; returns how many."""
        return self._cancel_where(lambda t: True)

    def _cancel_where(self, match) -> int:
        # chosen on the I/O thread (the only one that reads the core), cancelled there at once
        def pick():
            tids = [tid for tid, ts in self.core.tasks.items() if tid >= 0 and match(ts.task)]
            for tid in tids:
                self._server.post(Cancel(tid, "cancelled by the user"))
            return len(tids)
        return self._call(pick)

    # ---------------------------------------------------------------- files
    def undeclare_file(self, file: File) -> None:
        """The workers drop their copies of `file` (a task that needs it later gets it again)."""
        name = _cache_name(file, "undeclare_file")
        if name is not None:
            self._server.post(Undeclare(name))

    remove_file = undeclare_file     # TaskVine's older name
    prune_file = undeclare_file      # TaskVine's name for dropping the workers' copies and keeping the file

    def get_file_replica_count(self, file: File) -> int:
        """How many workers keep `file` in their cache: counted from when a copy is sent (or a
        temp made); a file declared with cache="task" (the default) is not kept past its task,
        so it counts 0."""
        name = _cache_name(file, "get_file_replica_count")
        return 0 if name is None else self._call(lambda: len(self.core.where.get(name, ())))

    def fetch_file(self, file: File, timeout: float = FETCH_TIMEOUT) -> str:
        """The contents of a file as a str (TaskVine's): a local file or buffer is read here, a
        URL fetched by the manager, a temp brought back from the worker holding it. Bytes that
        are not UTF-8 are kept as surrogate escapes (str.encode(errors="surrogateescape"))."""
        if not isinstance(file, File):
            raise TypeError("fetch_file needs a file from Manager.declare_*(), got %r" % (file,))
        if file.kind == "buffer":
            data = file.data
        elif file.kind == "url":
            with urllib.request.urlopen(file.source, timeout=timeout) as r:
                data = r.read()
        elif file.kind == "temp":
            data = self._fetch_temp(file, timeout)
        else:
            with open(file.source, "rb") as f:
                data = f.read()
        return data.decode("utf-8", errors="surrogateescape")

    def _fetch_temp(self, temp: File, timeout: float) -> bytes:
        """A task that copies the temp into a manager-side output; not returned by wait()."""
        dest = os.path.join(self.staging_directory, "fetch-%s" % temp.cachename())
        t = Task("cp -R -L in out")
        t.add_input(temp, "in")
        t.add_output(self.declare_file(dest), "out")
        done = threading.Event()
        self._submit(t, lambda task: done.set())
        if not done.wait(timeout):
            self.cancel(t)
            raise TimeoutError("fetch_file: the temp did not come back within %s s" % timeout)
        if not t.successful():
            raise OSError("fetch_file: cannot bring the temp back: %s (%s)" % (t.result, t.reason))
        try:
            with open(dest, "rb") as f:
                return f.read()
        finally:
            os.unlink(dest)

    def declare_untar(self, tarball: File, cache=False, peer_transfer=True) -> File:
        """A directory made by unpacking `tarball` (tar, tar.gz, tar.bz2, tar.xz).  A declared
        file, buffer or URL is unpacked once on the manager's side and travels as a directory
        (sent to each worker once; a URL is fetched by the manager); a temp (a task's output) is
        unpacked where it is, by a task on that worker, into a temp directory."""
        if not isinstance(tarball, File):
            raise TypeError("declare_untar needs a file from Manager.declare_*(), got %r" % (tarball,))
        if tarball.kind == "temp":
            return self._untar_on_a_worker(tarball)
        dest = os.path.join(self.staging_directory, "untar-" + tarball.cachename())
        if not os.path.isdir(dest):
            src = tarball.source
            if tarball.kind in ("buffer", "url"):
                src = dest + ".tar"
                if tarball.kind == "buffer":
                    with open(src, "wb") as f:
                        f.write(tarball.data)
                else:
                    with urllib.request.urlopen(tarball.source, timeout=FETCH_TIMEOUT) as r, open(src, "wb") as f:
                        shutil.copyfileobj(r, f, 1 << 20)
            _unpack(src, dest)
            if src != tarball.source:
                os.unlink(src)
        return self.declare_file(dest, cache=cache)

    def _untar_on_a_worker(self, tarball: File) -> File:
        t = Task("mkdir untarred && tar -xf tarball -C untarred")
        t.add_input(tarball, "tarball")
        return self.declare_minitask(t, "untarred")

    def declare_minitask(self, minitask: Task, source: str, cache=False, peer_transfer=True) -> File:
        """A file made by running `minitask` on a worker: its `source` becomes a temp.  vinehpc runs
        the mini-task at once (TaskVine: when a task first needs the file), not returned by
        wait(); if it fails, tasks using the file fail "input missing" saying why."""
        if not isinstance(minitask, Task):
            raise TypeError("declare_minitask needs a Task, got %r" % (minitask,))
        out = self.declare_temp()
        minitask.add_output(out, source)
        self._submit(minitask, lambda task: None)
        return out

    def declare_poncho(self, package, cache=False, peer_transfer=True) -> File:
        """Not supported: poncho packs a conda environment; vinehpc's environments are images built
        with `vinehpc sysimage python ...` and given to tasks with declare_image/add_environment."""
        raise NotImplementedError("declare_poncho: poncho (conda) packages are not supported; build a vinehpc "
                                  "environment image with `vinehpc sysimage python ... -o env.vimg` and use "
                                  "m.declare_image('env.vimg') with task.add_environment()")

    def declare_starch(self, starch, cache=False, peer_transfer=True) -> File:
        """Not supported (see declare_poncho): starch packages are not vinehpc images."""
        raise NotImplementedError("declare_starch: starch packages are not supported; build a vinehpc environment "
                                  "image with `vinehpc sysimage` and use m.declare_image() with task.add_environment()")


def _unpack(src: str, dest: str) -> None:
    """Unpack a tarball into `dest` atomically (a .part directory renamed), refusing members
    that would land outside it (tarfile's "data" filter)."""
    part = dest + ".part"
    shutil.rmtree(part, ignore_errors=True)
    os.makedirs(part)
    try:
        with tarfile.open(src, "r:*") as tar:
            tar.extractall(part, filter="data")
        os.replace(part, dest)
    except BaseException:
        shutil.rmtree(part, ignore_errors=True)
        raise


def _check_name(name) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError("the project name must be a non-empty string, got %r" % (name,))
    return name
