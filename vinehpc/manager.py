"""Manager: declare files, submit tasks, wait for them (TaskVine's nouns and verbs)."""
from __future__ import annotations

import atexit
import itertools
import logging
import os
import socket
import sys
import threading
import time

from . import _context
from ._context import ManagerOptions
from .config import Settings
from .core import Core, input_names
from .core.events import BlockHost, Cancel, Drain, Resumed, SlowMultiplier, Submit, UnblockHost
from .file import URL, Buffer, File, Temp, url_validators
from .journal import Journal
from .local import LocalWorkers
from .private import make_private
from .resume import Resume, task_key
from .protocol import auth, tls
from .patterns import PatternsMixin
from .serverless import LibraryMixin
from .server import BACKLOG, Server
from .status import Stats, write_final
from .task import PythonTask, Resumable, Task, _positive
from .taskvine_api import TaskVineAPI, _check_name

log = logging.getLogger("vinehpc.manager")
_run_seq = itertools.count()
_open = set()           # managers not closed yet: closed at interpreter exit (see _close_at_exit)
_open_lock = threading.Lock()
UNIX_SOCKET = "workers.sock"    # in the run directory: local workers connect through it (Server(unix=))


@atexit.register
def _close_at_exit():
    """Close what the script left open, while the I/O threads still run: at exit (not in __del__,
    which runs after daemon threads are frozen, so close() could only wait out its timeouts and
    the journal's lock may be held by a frozen thread). Workers are told to exit."""
    with _open_lock:
        managers = list(_open)
    for m in managers:
        try:
            m.close("the script ended without closing its manager")
        except Exception as e:
            log.warning("vinehpc: closing %r at exit failed: %s", m, e)


def _new_run_dir(root: str) -> str:
    stamp = time.strftime("%Y-%m-%dT%H%M%S")
    while True:
        d = os.path.join(root, "%s-%d-%d" % (stamp, os.getpid(), next(_run_seq)))
        try:
            os.makedirs(d)
        except FileExistsError:
            continue
        link_latest(d)
        return d


def link_latest(run_dir: str) -> None:
    """Point RUN_DIR/../latest at `run_dir` (relative, replaced atomically: another run may be
    doing the same), so the newest of the run directories that pile up is easy to find."""
    root, name = os.path.split(run_dir)
    tmp = os.path.join(root, ".latest-%d-%d" % (os.getpid(), threading.get_ident()))
    try:
        os.symlink(name, tmp)
        os.replace(tmp, os.path.join(root, "latest"))
    except OSError as e:        # a filesystem without symlinks: the run goes on
        log.info("cannot link %s/latest: %s", root, e)
        try:
            os.unlink(tmp)
        except OSError:
            pass


class Manager(TaskVineAPI, LibraryMixin, PatternsMixin):
    """Runs tasks on workers that connect to it over TCP.

    Under `vinehpc run` (or `vinehpc pilot`) a Manager() gets that run's workers with no
    configuration; given a port too (`Manager(9123)`, as TaskVine scripts start), it also
    listens there (if that port is taken, it says so and goes on with the run's workers).
    Alone, it listens on `port` (0: any free port; (low, high): the first free one of a
    range) and waits for workers started with `vinehpc worker HOST:PORT --secret-file FILE`
    (the command is logged and written to the run directory), or starts `local_workers`
    processes itself.  Local workers (its own, or `vinehpc run`'s) connect through a Unix
    socket instead, `unix_path` (RUN_DIR/workers.sock; none with TLS).

    TaskVine's arguments: name (the project name, in stats and the journal), run_info_path
    (where run directories go; run_info_template names this run's), staging_path, init_fn
    (called with the new manager), ssl (True: TLS on the manager's port with a self-signed
    certificate made for this run; (key_file, cert_file): with yours; workers check the
    certificate by its fingerprint, `tls_fingerprint`, which travels with the secret; see
    vinehpc/protocol/tls.py), shutdown and status_display_interval (accepted; workers always
    exit with the manager, no widget).

    Keyword arguments: host (address to bind, default all interfaces, or loopback for local
    runs), secret (default: VINEHPC_SECRET or a fresh one), run_dir (default
    ./vine-run-info/<time>), local_workers, cores_per_worker, scheduler ("files" or "fcfs"),
    resume (default: on under `vinehpc pilot`): tasks that completed in an earlier run with the
    same run_dir are returned as recorded instead of run again (see vinehpc/resume.py for
    what makes two tasks the same).  tunnel=True: tasks reach the outside through this
    manager (an egress beside it; `tunnel_allow` limits destinations, host patterns with
    optional :port); tunnel="HOST:PORT": through a `vinehpc net gateway` there.
    settings: the environment's configuration (vinehpc.config.Settings; default: the
    launcher's, else read from the environment now).  metrics_port: serve the run's figures
    (m.stats, `vinehpc status`) as Prometheus metrics at http://metrics_host:PORT/metrics
    (needs prometheus_client; off by default; loopback unless metrics_host says otherwise).
    """

    def __init__(self, port=None, name: str | None = None, shutdown: bool = False, run_info_path: str | None = None,
                 run_info_template: str | None = None, staging_path: str | None = None, ssl=None, init_fn=None,
                 status_display_interval=None, *, host: str | None = None, secret: str | None = None,
                 run_dir: str | None = None, local_workers: int | None = None,
                 cores_per_worker: int | None = None, scheduler: str = "files",
                 keepalive_interval: float | None = None, keepalive_timeout: float | None = None,
                 resume: bool | None = None, tunnel=None, tunnel_allow=None, settings: Settings | None = None,
                 metrics_port: int | None = None, metrics_host: str = "127.0.0.1"):
        ports = _ports(port)
        ctx = _context.current()
        launched = ctx is not None and local_workers is None
        opts = ctx.manager_options() if launched else ManagerOptions()
        self._ctx = ctx if launched else None
        self.name = None if name is None else _check_name(name)
        if local_workers is not None and (isinstance(local_workers, bool) or not isinstance(local_workers, int)
                                          or local_workers < 0):
            raise ValueError("local_workers must be a non-negative integer, got %r" % (local_workers,))
        self.settings = settings = settings or opts.settings or Settings.from_env()
        self.secret = secret or opts.secret or settings.secret or auth.new_secret()
        asked_host = host
        if host is None:
            host = opts.host or ("127.0.0.1" if local_workers else "0.0.0.0")
        if run_info_template is not None and (os.path.isabs(run_info_template) or os.sep in run_info_template):
            # (a path here is most likely a staging_path given by position: older TaskVine had it 5th)
            raise ValueError("Manager(run_info_template=%r): the template names this run's directory under "
                             "run_info_path, it is not a path; older TaskVine took staging_path as the 5th "
                             "argument: pass it by keyword (staging_path=...)" % (run_info_template,))
        if run_dir:
            self.run_dir = os.path.abspath(run_dir)
        elif opts.run_dir:
            self.run_dir = opts.run_dir        # a launcher's (stable across resubmissions)
        elif run_info_path and run_info_template:
            self.run_dir = os.path.abspath(os.path.join(run_info_path, run_info_template))
        else:
            self.run_dir = _new_run_dir(os.path.abspath(run_info_path) if run_info_path else settings.run_dir_root)
        make_private(self.run_dir)      # 0700 whatever the umask: results, outputs and the journal are the user's
        staging = os.path.join(staging_path, "vine-staging") if staging_path else os.path.join(self.run_dir, "staging")
        self.staging_directory = staging = os.path.abspath(staging)
        make_private(staging)
        server_tls = _server_tls(ssl, opts.ssl, self.run_dir)
        self.using_ssl = server_tls is not None
        self.tls_fingerprint = server_tls.fingerprint if server_tls is not None else None
        self.resume = Resume(self.run_dir) if (resume if resume is not None else opts.resume) else None
        self.journal = Journal(os.path.join(self.run_dir, "transactions.jsonl"))
        self.core = Core(policy=scheduler)
        self._egress = None
        tunnel = tunnel if tunnel is not None else opts.tunnel
        tunnel_info = None
        if tunnel is True:
            from userlevel_net.egress import Egress   # lazily: only runs that tunnel need it
            self._egress = Egress(self.secret, host=host, allow=tunnel_allow).start()
            tunnel_info = {"port": self._egress.port}
        elif isinstance(tunnel, str) and tunnel:
            tunnel_info = {"egress": tunnel}
        elif tunnel not in (None, False):
            raise ValueError("tunnel must be True, False or a gateway's HOST:PORT, got %r" % (tunnel,))
        ka_i = keepalive_interval or settings.keepalive_interval
        ka_t = keepalive_timeout or settings.keepalive_timeout
        also = None
        if launched and ports != [0]:
            # TaskVine scripts name a port: under a run, workers come through the run's own socket,
            # and the port asked for is one more way in (a busy one costs nothing but a warning)
            try:
                also = _listen(asked_host or "0.0.0.0", ports)
            except OSError as e:
                log.warning("vinehpc: cannot also listen on port %s (%s); the run's workers are used", port, e)
            ports = [0]
        try:
            lsock = opts.sock or _listen(host, ports)
        except OSError as e:
            if also is not None:
                also.close()
            raise OSError(e.errno, "cannot listen on %s:%s: %s (choose another port, or 0 for any)"
                          % (host, port, e.strerror)) from None
        self._server = Server(self.core, host=host, port=0, secret=self.secret, journal=self.journal, staging=staging,
                              keepalive_interval=ka_i, keepalive_timeout=ka_t, sock=lsock,
                              own_sock=opts.sock is None, final_exit=opts.final_exit, resume=self.resume,
                              tunnel=tunnel_info, also=also, tls=server_tls,
                              unix=os.path.join(self.run_dir, UNIX_SOCKET) if local_workers or opts.local else None)
        # the Unix socket local workers connect through (None: TCP; with TLS there is none)
        self.unix_path = self._server.unix_path
        self.port = also.getsockname()[1] if also is not None else self._server.port
        self.host = host
        contact = host if host not in ("0.0.0.0", "::", "") else socket.gethostname()
        self.address = opts.address or "%s:%d" % (contact, self.port)
        self.secret_file = None
        if opts.write_secret:
            self.secret_file = os.path.join(self.run_dir, "secret")
            auth.write_secret(self.secret_file, self.secret)
            if server_tls is not None:      # beside the secret: `vinehpc worker --secret-file` finds it
                with open(os.path.join(self.run_dir, tls.FINGERPRINT_FILE), "w") as f:
                    f.write(self.tls_fingerprint + "\n")
        self._server.record({"event": "manager started", "time": round(time.time(), 6),   # as the log shows it
                             "address": self.address, "pid": os.getpid(), "tls": self.tls_fingerprint,
                             "python": sys.version.split()[0], "name": self.name,
                             "resumable": len(self.resume.completed) if self.resume else None})
        self._server.publish_stats()
        if self.resume is not None and self.resume.completed:
            log.warning("vinehpc: %s records %d completed task(s): the same tasks submitted again are resumed, "
                        "not run (remove it to start afresh)", self.run_dir, len(self.resume.completed))
        self._metrics = None
        metrics_port = metrics_port if metrics_port is not None else opts.metrics_port
        if metrics_port is not None:
            from .metrics import serve     # lazily: prometheus_client is an optional dependency
            self._metrics = serve(self._server, metrics_port, metrics_host, name=self.name)
        self.metrics_port = self._metrics.port if self._metrics is not None else None
        self._submitted = self._returned = 0
        self._closed = False
        self._local = None
        self._server.start()
        with _open_lock:
            _open.add(self)     # held until close(): an open manager has an I/O thread and workers
        if self._ctx is not None:
            self._ctx.manager_started(self)
        elif local_workers:
            self._local = LocalWorkers(local_workers, cores=cores_per_worker or 1, worker_dir=settings.worker_dir,
                                       log_dir=os.path.join(self.run_dir, "workers"))
            self._local.start("127.0.0.1:%d" % self.port, self.secret, self.tls_fingerprint, unix=self.unix_path)
        else:
            log.warning("vinehpc manager listening on %s%s; add workers with: vinehpc worker %s --secret-file %s%s",
                        self.address, " (TLS)" if server_tls else "", self.address, self.secret_file,
                        " --tls-fingerprint " + self.tls_fingerprint if server_tls else "")
        if init_fn is not None:
            init_fn(self)

    def __repr__(self):
        return "<vinehpc.Manager %s %s>" % (self.address, self.run_dir)

    # ---------------------------------------------------------------- files
    def declare_file(self, path, cache=False, peer_transfer=True, unlink_when_done=False) -> File:
        """A file or directory on the manager's side, as an input or an output of tasks.

        cache: False/"task" (removed from the worker after the task), True/"workflow" (kept
        for this manager's life), "worker", "always" or "forever" (kept on the worker after the manager
        ends; vinehpc keeps no cache beyond a worker's life, so all three mean the worker's).
        peer_transfer: False: workers never get it from each other, always from the manager (with
        peer transfers on, a cached plain file travels between workers; see enable_peer_transfers).
        unlink_when_done (TaskVine's): accepted; the manager's file is never deleted.
        """
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise TypeError("declare_file needs a path, got %r" % (path,))
        f = File(os.path.abspath(os.fspath(path)), cache)
        f.peer_transfer = bool(peer_transfer)
        if f.exists():
            f.cachename()   # its identity is its content as declared (stat-checked again when a task is submitted)
        return f

    def declare_image(self, path, cache="worker") -> File:
        """An environment image built by `vinehpc sysimage` (.vimg). Give it to tasks with
        task.add_environment(image): it travels to each worker once through the file cache,
        is unpacked once per node, and those tasks run inside it. Kept on workers by default
        ("worker" cache level), since unpacking it again is what images avoid."""
        f = self.declare_file(path, cache=cache)
        if not os.path.isfile(f.source):
            raise FileNotFoundError("environment image %r does not exist: build one with `vinehpc sysimage python "
                                    "... -o %s`" % (f.source, os.path.basename(f.source)))
        from sysimage_tools.image import ImageError, image_id
        try:
            f.image = image_id(f.source)
        except ImageError as e:
            raise ValueError("%r is not a usable environment image: %s" % (f.source, e)) from None
        return f

    def declare_buffer(self, data=None, cache=False, peer_transfer=True) -> File:
        """Bytes from memory, written to a file in the task's sandbox (executable, as in TaskVine).
        None: an empty file."""
        if data is None:
            data = b""
        if isinstance(data, str):
            data = data.encode()
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError("declare_buffer needs bytes or str, got %s" % type(data).__name__)
        return Buffer(data, cache)

    def declare_temp(self) -> File:
        """A file produced by one task and consumed by later ones; it stays on the worker."""
        return Temp()

    def declare_url(self, url: str, cache=False, peer_transfer=True) -> File:
        """Fetched by the worker itself (http, https, file); executable there, as in TaskVine."""
        if not isinstance(url, str) or not url.split(":", 1)[0] in ("http", "https", "file"):
            raise ValueError("declare_url needs an http://, https:// or file:// URL, got %r" % (url,))
        return URL(url, cache, url_validators(url))

    # ---------------------------------------------------------------- tasks
    def submit(self, task: Task, *, worker=None, on_start=None, on_done=None) -> int:
        """Queue a task; returns its id. Errors in the task (bad pickles, missing inputs) raise here.

        worker: the id of a connected worker (see workers()): the task may run only there, and
        fails if that worker leaves.  on_done(task): the finished task goes there instead of to
        wait(), and does not count for empty().  on_start(task): called when the task is first
        sent to a worker.  Both are called on the manager's I/O thread: keep them short and do
        not call the Manager back."""
        return self._submit(task, on_done, on_start=on_start, pin=worker)

    def _submit(self, task: Task, on_done, on_start=None, pin=None) -> int:
        self._check_open()
        if not isinstance(task, Task):
            raise TypeError("submit needs a Task or PythonTask, got %r" % (task,))
        if task.state != "new":
            raise ValueError("task %s was already submitted; create a new Task to run it again" % task.id)
        task._check()
        for f, remote in task.inputs:
            if f.kind == "file" and f.producer is None:
                if not f.exists():
                    raise FileNotFoundError("input %r of the task does not exist (it would be %r in the sandbox)"
                                            % (f.source, remote))
        inputs = input_names(task)   # hashed here, on the caller's thread: the core does no I/O
        if self.resume is not None:
            task._key = task_key(task)
            for f, remote in task.outputs:
                f._made_by = (task._key, remote)
        task.id = self._next_id(count=on_done is None)
        for f, _ in task.outputs:
            f.producer = task.id
        task.state = "submitted"
        rec = self.resume.lookup(task) if self.resume is not None else None
        if rec is not None:
            self.resume.restore(task, rec)
            self._server.post(Resumed(task, on_done))
        else:
            self._server.post(Submit(task, inputs, on_start=on_start, on_done=on_done, pin=pin))
        return task.id

    _ids = itertools.count(1)
    _ids_lock = threading.Lock()

    def _next_id(self, count=True):
        with self._ids_lock:
            if count:
                self._submitted += 1
            return next(self._ids)

    @property
    def _outstanding(self):
        return self._submitted - self._returned

    def wait(self, timeout=None) -> Task | None:
        """The next finished task, or None if none finished within `timeout` seconds.

        As in TaskVine, the default (None, "wait_forever" or a negative number) waits until a
        task finishes -- and returns None at once when no task is outstanding."""
        return self._wait(None, timeout)

    def _wait(self, match, timeout) -> Task | None:
        """The first finished task `match` accepts (None: any), within `timeout` (see wait)."""
        srv = self._server
        if timeout == "wait_forever" or (isinstance(timeout, (int, float)) and timeout < 0):
            timeout = None
        deadline = None if timeout is None else time.monotonic() + timeout
        with srv.cond:
            while True:
                task = _take(srv.done, match)
                if task is not None:
                    break
                if srv.drained:
                    raise Resumable("the manager stopped for the walltime; %d task(s) not run: submit the same "
                                    "job again to run them (completed tasks are not run again)" % self._outstanding)
                if srv.error is not None:
                    raise RuntimeError("the manager's I/O thread failed: %r" % (srv.error,)) from srv.error
                if self._outstanding == 0 or self._closed:
                    return None
                if deadline is None:
                    srv.cond.wait(1.0)
                else:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    srv.cond.wait(left)
            self._returned += 1
        return task

    def drain(self, grace: float) -> None:
        """Stop dispatching; give running tasks `grace` seconds, then cancel them. Afterwards
        wait() raises vinehpc.Resumable once the finished tasks are collected (walltime)."""
        self._server.post(Drain(float(grace)))

    def empty(self) -> bool:
        """True when every submitted task has been returned by wait()."""
        return self._outstanding == 0

    def cancel(self, task) -> None:
        """Cancel a task (or task id): it comes back from wait() with result 'cancelled'."""
        tid = task.id if isinstance(task, Task) else task
        self._server.post(Cancel(tid))

    # ---------------------------------------------------------------- categories
    def set_category_mode(self, category: str, mode: str) -> None:
        """How tasks of `category` get their memory and disk: "fixed" (what they ask; the default),
        "max", "min-waste", "max-throughput", "greedy-bucketing" or "exhaustive-bucketing" (learnt
        from the measured peaks of completed tasks; see vinehpc/core/categories.py)."""
        from .core.categories import check_mode
        check_mode(mode)
        self._call(lambda: self.core.category(category).set_mode(mode))

    def set_category_first_allocation_guess(self, category: str, resources: dict) -> None:
        """What tasks of `category` get before enough have completed (default: a whole worker),
        e.g. {"memory": 4000, "disk": 1000} in MB."""
        self._call(lambda: self.core.category(category).first.update(_mb(resources)))

    def set_category_max_resources(self, category: str, resources: dict) -> None:
        """Never give tasks of `category` more than this, e.g. {"memory": 16000} (MB): a task that
        exhausts this much is returned as "resource exhaustion" instead of retried larger."""
        self._call(lambda: self.core.category(category).max.update(_mb(resources)))

    def set_category_retry_budget(self, category: str, share: float | None) -> None:
        """The share of tasks of `category` a learnt allocation (min-waste, max-throughput, the
        bucketing modes) may leave too small, so that they run twice: 0.05 by default (one task
        in 20). Smaller wastes more memory; None or 1 is no limit (the bucketing modes are then
        Phung & Thain's method as published, which retries 15-30% of tasks on a mixed category)."""
        if share is not None and (isinstance(share, bool) or not isinstance(share, (int, float))
                                  or not 0 <= share <= 1):
            raise ValueError("retry budget must be a share between 0 and 1 (e.g. 0.05) or None, got %r"
                             % (share,))
        budget = None if share is None or share >= 1 else float(share)
        self._call(lambda: self.core.category(category).set_retry_budget(budget))

    def enable_disconnect_slow_workers(self, multiplier: float, category: str | None = None) -> None:
        """Fast abort: a task running longer than `multiplier` x the mean of its category's successful
        runs (after 3 of them) is killed and run again elsewhere; a worker where this happens twice is
        blocked for 5 minutes. `category`: only that one (default: every category). 0 turns it off."""
        if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)) or multiplier < 0:
            raise ValueError("multiplier must be a non-negative number, got %r" % (multiplier,))
        self._server.post(SlowMultiplier(category, float(multiplier)))

    def block_host(self, host: str, seconds: float = 0) -> None:
        """Send no more tasks to workers on `host` (for `seconds`; 0: until unblock_host)."""
        self._server.post(BlockHost(host, seconds))

    def unblock_host(self, host: str) -> None:
        self._server.post(UnblockHost(host))

    def stats_category(self, category: str) -> dict:
        """Allocations, measured use, exhaustions and waste (allocated minus used, times seconds)."""
        return self._call(lambda: self.core.category(category).stats())

    def _call(self, fn, timeout=10.0):
        """Run fn() on the I/O thread (the only thread that touches the core) and return its value."""
        if self._server.stopped.is_set():
            return fn()
        box, ev = [], threading.Event()
        self._server.post(("call", fn, box, ev))
        if not ev.wait(timeout):
            raise TimeoutError("the manager's I/O thread did not answer within %s s" % timeout)
        return box[0]

    @property
    def stats(self) -> Stats:
        """The run's figures, as TaskVine names them (tasks_waiting, tasks_running, tasks_done --
        failures included --, tasks_failed, workers_connected, workers_busy, bytes_sent, ...; see
        vinehpc/status.py), read as attributes or keys; also the older keys submitted, waiting,
        running, done (succeeded), failed, workers, and the project name.  Cheap: a copy of what
        the I/O thread last published, never a call into it."""
        s = self._server.stats
        s["name"] = self.name
        return s

    def workers(self) -> list:
        """One dict per connected worker: id, host, resources, running tasks, cached files."""
        return self._call(self.core.worker_list)

    def probe_network(self, targets=(), timeout: float = 60.0) -> list:
        """Run the outbound-access probe (userlevel_net.probe) on every connected worker: DNS,
        direct TCP to each HOST:PORT target, proxy variables, user namespaces, slirp4netns.
        One dict per worker, within `timeout` seconds; userlevel_net.probe.render_table()
        makes a table of them."""
        from .netprobe import probe_workers      # lazily: it imports userlevel_net
        return probe_workers(self, list(targets), timeout=3.0, deadline=timeout)

    def wait_for_workers(self, n: int, timeout: float = 60.0) -> int:
        """Block until `n` workers are connected; returns how many are. Raises TimeoutError."""
        srv = self._server
        with srv.cond:
            if not srv.cond.wait_for(lambda: srv.n_workers >= n or srv.error is not None, timeout):
                raise TimeoutError("%d of %d workers connected after %.0f s (see %s)"
                                   % (srv.n_workers, n, timeout, self.run_dir))
            self._check_open()
            return srv.n_workers

    @property
    def manager_cpu_seconds(self) -> float:
        """CPU time the I/O thread used so far (complete after close())."""
        return self._server.cpu if self._server.stopped.is_set() else self._call(lambda: time.thread_time())

    # ---------------------------------------------------------------- state, for Executors and launchers
    @property
    def closed(self) -> bool:
        """close() was called, or the manager stopped."""
        return self._closed or self._server.stopped.is_set()

    @property
    def drained(self) -> bool:
        """A drain (walltime) ended: tasks not returned yet will not run in this run."""
        return self._server.drained

    @property
    def error(self):
        """The exception that stopped the manager's I/O thread, or None."""
        return self._server.error

    # ---------------------------------------------------------------- life cycle
    def _check_open(self):
        if self._closed:
            raise RuntimeError("this manager is closed; create a new Manager")
        if self._server.error is not None:
            raise RuntimeError("the manager's I/O thread failed: %r" % (self._server.error,))

    def close(self, reason: str = "manager closed") -> None:
        """Tell the workers to exit, stop the I/O thread, and stop any local workers."""
        if self._closed:
            return
        self._closed = True
        with _open_lock:
            _open.discard(self)
        self._server.stop(reason)
        self._server.stopped.wait(15)
        with self._server.cond:
            self._server.cond.notify_all()
        self._server.record({"event": "manager stopped", "reason": reason,
                             "io_cpu_seconds": round(self._server.cpu, 3)})
        self._server.publish_stats()
        if self._metrics is not None:
            self._metrics.stop()
        self.journal.close()
        try:
            write_final(self.run_dir, self._server.status)     # `vinehpc status RUN_DIR` reads it at once
        except OSError as e:
            log.warning("vinehpc: cannot write %s/status.json: %s", self.run_dir, e)
        if self.resume is not None:
            if self.resume.resumed:      # a resumed run must not look like a run that did its work again
                log.warning("vinehpc: %d/%d tasks resumed from %s (remove it to start afresh)",
                            self.resume.resumed, self._submitted, self.run_dir)
            self.resume.close()
        if self._egress is not None:
            self._egress.stop()
        if self._local is not None:
            self._local.stop()
        if self._ctx is not None:
            self._ctx.manager_closed(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _take(done, match):
    """Remove and return the first task of the deque `done` that `match` accepts (None: the first)."""
    if not done:
        return None
    if match is None:
        return done.popleft()
    for i, t in enumerate(done):
        if match(t):
            del done[i]
            return t
    return None


def _ports(port) -> list:
    """The ports a Manager may listen on: [0] (any), [p], or a TaskVine (low, high) range."""
    if port is None:
        return [0]
    if isinstance(port, (tuple, list)) and len(port) == 2:
        low, high = port
        if all(isinstance(p, int) and not isinstance(p, bool) and 1 <= p <= 65535 for p in port) and low <= high:
            return list(range(low, high + 1))
    elif isinstance(port, int) and not isinstance(port, bool) and 0 <= port <= 65535:
        return [port]
    raise ValueError("port must be an integer between 0 and 65535 or a (low, high) range, got %r" % (port,))


def _listen(host: str, ports: list) -> socket.socket:
    """A listening socket on the first port of `ports` that is free (the last error if none is)."""
    for i, p in enumerate(ports):
        try:
            return socket.create_server((host, p), backlog=BACKLOG)
        except OSError:
            if i + 1 == len(ports):
                raise


def _mb(resources) -> dict:
    from .core.categories import LEARNED
    out = {}
    for k, v in dict(resources).items():
        if k not in LEARNED:
            raise ValueError("category allocations cover %s, got %r" % (" and ".join(LEARNED), k))
        out[k] = float(_positive("%s (MB)" % k, v))
    return out


__all__ = ["Manager", "Task", "PythonTask"]


def _server_tls(asked, run, run_dir):
    """The manager's TLS certificate (protocol.tls.ServerTLS), or None for no TLS.  `asked`:
    Manager(ssl=): True (a self-signed pair made for this run, in its private directory), a
    (key_file, cert_file) pair, or None/False.  `run`: a launcher's choice (ManagerOptions.ssl):
    None leaves it to `asked`; True (`vinehpc run --ssl`) turns TLS on, with the script's own pair
    if it gave one; a pair or False is the run's and wins (a pilot's workers already know it)."""
    if run is True:
        choice = asked or True
    elif run is not None:
        if asked and not run:
            log.warning("vinehpc: Manager(ssl=...) ignored: this run's workers connect without TLS; start the "
                        "run with --ssl (or VINEHPC_SSL=1) for TLS")
        choice = run
    else:
        choice = asked
    if not choice:
        return None
    if choice is True:
        return tls.ServerTLS(*tls.generate_pair(run_dir))
    if isinstance(choice, (tuple, list)) and len(choice) == 2 and all(isinstance(x, (str, os.PathLike))
                                                                       for x in choice):
        return tls.ServerTLS(os.fspath(choice[0]), os.fspath(choice[1]))
    raise ValueError("ssl must be True or a (key_file, cert_file) pair, got %r" % (choice,))
