"""`vinehpc pilot`: a manager and its workers inside one allocation, met through MPI.

MPI is used only to meet: rank 0 opens the manager's listening socket and broadcasts its
address and the run's secret (in memory, never on disk), every rank reports how many
workers it starts, and then MPI is finalized.  From there on workers are ordinary processes
talking TCP, so a dead worker (kill -9, OOM) is a lost worker whose tasks run elsewhere, not
an MPI abort of the whole job.

Rank 0 runs tasks.py as __main__; every Manager()/Executor() it creates gets the pilot's
workers.  The other ranks start workers sized from the allocation and wait for them.  When
tasks.py ends the workers are told to exit and every rank exits 0 (rank 0 exits with the
script's status).  On a drain request (RUN_DIR/drain-request: jobscripts/vine.sh writes one
on the walltime warning, see vinehpc/drain.py), or SIGUSR1/SIGTERM sent to rank 0 itself, the
managers stop dispatching, give running tasks a grace period, record what completed and rank 0
exits with RESUMABLE (75): submitting the same job again runs only what is left.  No rank dies
from SIGUSR1 (handled from the first line of main(), MPI_Init included).
"""
from __future__ import annotations

import collections
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
import time

from vinehpc._context import ManagerOptions
from vinehpc.local import start_workers, stop_workers

from vinehpc import drain

from . import slurm
from .contact import write_contact
from .progress import Progress

_HELD = []              # the run directory's lock, held for the life of rank 0
RESUMABLE = 75          # EX_TEMPFAIL: "try again" - the job stopped early and can be resumed
_EARLY = collections.deque()   # signals that came before rank 0's drain watcher existed
log = logging.getLogger("vinehpc.pilot")


def contact_host(settings) -> str:
    """An address of this node that other hosts can reach: settings.manager_host
    ($VINEHPC_MANAGER_HOST), else the hostname's address, else (it maps to loopback, as
    Debian's 127.0.1.1 does) the first non-loopback IPv4 address of this node's interfaces."""
    if settings.manager_host:
        return settings.manager_host
    name = socket.gethostname()
    try:
        addr = socket.gethostbyname(name)
    except OSError:
        addr = None
    if addr and not ipaddress.ip_address(addr).is_loopback:
        return addr
    try:
        import psutil
        for nic, addrs in sorted(psutil.net_if_addrs().items()):
            for a in addrs:
                if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback:
                    return a.address
    except (ImportError, OSError, ValueError):
        pass
    return addr or name


def plan_workers(rank, nodes, *, workers_per_node=None, manager_node_works=False):
    """How many workers `rank` starts: one per worker rank, or `workers_per_node` on the
    lowest worker rank of each node. Rank 0 hosts workers only with manager_node_works."""
    me = nodes[rank]
    worker_ranks = [r for r, n in enumerate(nodes) if n == me and (r != 0 or manager_node_works)]
    if rank not in worker_ranks:
        return 0, len([n for n in nodes if n == me])
    ranks_on_node = len([n for n in nodes if n == me])
    if workers_per_node is None:
        return 1, ranks_on_node
    return (workers_per_node if rank == worker_ranks[0] else 0), ranks_on_node


class PilotRun:
    """The run context of rank 0 (see vinehpc/_context.py)."""

    def __init__(self, lsock, address, secret, run_dir, settings, *, expected_workers, grace, tunnel=None,
                 ssl=None):
        self.lsock = lsock
        self.ssl = ssl      # the run's TLS (key, cert), or None: its workers were started knowing which
        self.settings = settings
        self.address = address
        self.secret = secret
        self.run_dir = run_dir
        self.expected = expected_workers
        self.grace = grace
        self.tunnel = tunnel
        self.managers = []
        self.n_managers = 0
        self.last_connected = None     # workers connected when the last manager closed
        self.walltime = None
        self.lock = threading.Lock()
        self.watcher = None        # the drain watcher (vinehpc/drain.py), set by main()
        # a pilot's stderr is a job's log: a line a minute there (a redrawn line on a terminal)
        self.progress = Progress("vinehpc pilot", self._counted, live=sys.stderr.isatty(),
                                 interval=settings.progress_interval)

    def _counted(self):
        with self.lock:
            return list(self.managers)

    def open_manager(self):
        with self.lock:
            ms = [m for m in self.managers if not m.closed]
        return ms[-1] if ms else None

    def manager_options(self):
        if self.open_manager() is not None:
            raise RuntimeError("a pilot runs one Manager at a time (its workers serve one manager): close the "
                               "first one (m.close()) before creating another, or share it: Executor(manager=m)")
        with self.lock:
            d = os.path.join(self.run_dir, "manager-%d" % self.n_managers)
            self.n_managers += 1
        return ManagerOptions(sock=self.lsock, secret=self.secret, address=self.address, run_dir=d,
                              final_exit=False, resume=True, write_secret=False, tunnel=self.tunnel,
                              settings=self.settings, ssl=self.ssl or False)

    def manager_started(self, m):
        with self.lock:
            self.managers.append(m)
            late = self.walltime is not None
        if late:
            m.drain(0.0)

    def manager_closed(self, m):
        self.progress.closed(m)
        with self.lock:
            if m in self.managers:
                self.managers.remove(m)
            self.last_connected = len(m.workers())

    def on_walltime(self, signum, frame):
        """SIGUSR1/SIGTERM sent to rank 0 itself: handed to the drain watcher (a handler takes no lock)."""
        self.watcher.notify(signal.Signals(signum).name)

    def drain(self, grace, why):
        """The drain watcher's call: stop dispatching, let running tasks finish within the grace."""
        grace = drain.grace_for(why, grace, self.grace)
        with self.lock:
            first = self.walltime is None
            if first:
                self.walltime = why
            ms = list(self.managers)
        if first and ms:
            sys.stderr.write("vinehpc pilot: drain requested (%s): no new tasks; running ones get %g s\n"
                             % (why, grace))
        elif first:
            sys.stderr.write("vinehpc pilot: drain requested (%s) before the run was up: no task will run; "
                             "the job stops RESUMABLE\n" % why)
        for m in ms:
            m.drain(grace)

    def shutdown(self):
        for m in list(self.managers):
            try:
                m.close("tasks.py ended")
            except Exception:
                pass

    def release_workers(self, timeout=5.0):
        """Tell the workers that come back (between managers they reconnect) to exit."""
        # the workers of the last manager come back at once; lost ones never do (and one still
        # starting finds the socket closed afterwards and exits)
        expected = self.expected if self.last_connected is None else self.last_connected
        from vinehpc.release import release_workers    # rank 0 only, at the end
        return release_workers(self.lsock, self.secret, expected, staging=self.run_dir, timeout=timeout,
                               tls=self.ssl)


def share_image(comm, MPI, rank, nodes, image, unpack):
    """Rank 0 reads the image once (one shared-filesystem read per job) and broadcasts it to
    the lowest rank of every node, which writes it to node-local disk and unpacks it there
    when `unpack` (that node hosts workers). Returns this node's local copy of the image."""
    from sysimage_tools import deploy
    from sysimage_tools.image import image_id
    leader = nodes.index(nodes[rank]) == rank
    sub = comm.Split(0 if leader else MPI.UNDEFINED, rank)
    info = None
    if rank == 0:
        info = {"id": image_id(image), "size": os.path.getsize(image)}
    info = comm.bcast(info, root=0)
    local = os.path.join(deploy.cache_root(), "%s.vimg" % info["id"])
    if leader:
        data = bytearray(info["size"])
        if rank == 0:
            with open(image, "rb") as f:
                f.readinto(data)
        view = memoryview(data)
        step = 64 << 20
        for off in range(0, len(data), step):
            sub.Bcast([view[off:off + step], MPI.BYTE], root=0)
        if not os.path.exists(local):
            tmp = "%s.%d.part" % (local, os.getpid())
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, local)
        if unpack:
            deploy.ensure_local(local, info["id"])
        sub.Free()
    comm.Barrier()         # every node's copy is in place before any worker starts
    return local


def main(script, argv, settings, *, workers_per_node=None, cores_per_worker=None, manager_node_works=False,
         run_dir=None, port=0, grace=None, connect_timeout=300.0, image=None, tunnel=None, ssl=False) -> int:
    """A pilot rank; `settings`: the environment's vinehpc.config.Settings.  `ssl`: TLS with a
    certificate made for the run by rank 0 (its fingerprint reaches the workers with the secret)."""
    import faulthandler

    started = time.time()      # a drain request without a job counts only if made after this
    # before MPI_Init too: SIGUSR1's default action would kill the rank (rank 0 acts on it later)
    signal.signal(signal.SIGUSR1, lambda signum, frame: _EARLY.append(signal.Signals(signum).name))
    # MPI_Init runs in C holding the GIL: only faulthandler's own watchdog thread can end a rank
    # stuck there (a wrong `srun --mpi=`, a broken PMI), with every thread's traceback, instead of
    # the allocation hanging silently until its walltime.
    init_timeout = settings.mpi_init_timeout
    if init_timeout > 0:
        faulthandler.dump_traceback_later(init_timeout, exit=True)
    try:
        from mpi4py import MPI   # lazily, and only here (importing it runs MPI_Init)
    finally:
        if init_timeout > 0:
            faulthandler.cancel_dump_traceback_later()

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    node = settings.slurm.node_name or MPI.Get_processor_name()
    nodes = comm.allgather(node)
    hosts = comm.allgather(socket.gethostname())
    if rank == 0 and size == 1 and not manager_node_works:
        manager_node_works = True   # a single rank: it has to host the workers too
    if rank == 0:
        err = None
        if not os.path.isfile(script):
            err = "no such file: %s" % script
        elif image is not None and not os.path.isfile(image):
            err = "no such environment image: %s (build one with: vinehpc sysimage python ...)" % image
        else:
            from vinehpc.manager import link_latest
            from vinehpc.resume import RunDirInUse, lock_run_dir
            given_dir = run_dir is not None
            run_dir = os.path.abspath(run_dir or os.path.join(
                os.getcwd(), "vine-run-info", "pilot-" + os.path.splitext(os.path.basename(script))[0]))
            os.makedirs(run_dir, exist_ok=True)
            if not given_dir:
                link_latest(run_dir)
            try:
                _HELD.append(lock_run_dir(run_dir))     # held until this process ends
                drain_key = drain.ensure_key(run_dir)
            except (RunDirInUse, OSError, ValueError) as e:    # ValueError: a bad RUN_DIR/drain-key
                err = str(e)
        pair = fingerprint = None
        if ssl and not err:
            from vinehpc.protocol import tls
            try:    # made before any worker starts: they connect knowing its fingerprint
                pair = tls.generate_pair(run_dir)
                fingerprint = tls.ServerTLS(*pair).fingerprint
            except (RuntimeError, ValueError, OSError) as e:
                err = "TLS: %s" % e
        if err:
            comm.bcast({"error": err}, root=0)
            print("vinehpc pilot: " + err, file=sys.stderr)
            return 2
        from vinehpc.protocol import auth
        from vinehpc.server import BACKLOG      # every rank's worker connects in the same second
        lsock = socket.create_server(("", port), backlog=BACKLOG)
        port = lsock.getsockname()[1]
        contact = "%s:%d" % (contact_host(settings), port)
        # all ranks on this host: they meet on loopback; the contact file has the routable address
        one_host = len(set(hosts)) == 1 and not settings.manager_host
        address = "127.0.0.1:%d" % port if one_host else contact
        secret = auth.new_secret()
        # each worker copies its log there when it exits: node-local disks vanish with the allocation
        meet = {"address": address, "secret": secret, "contact": contact, "logs": os.path.join(run_dir, "workers"),
                "tls": fingerprint}
    else:
        meet = None
    meet = comm.bcast(meet, root=0)
    if "error" in meet:
        return 0 if rank else 2
    n, ranks_on_node = plan_workers(rank, nodes, workers_per_node=workers_per_node,
                                    manager_node_works=manager_node_works)
    cpus = slurm.cpus_for_rank(settings.slurm, ranks_on_node=ranks_on_node)
    if rank == 0 and n:
        cpus = max(1, cpus - 1) if cpus > 1 else 1    # leave the manager a core where there is one
    cores = cores_per_worker or max(1, cpus // max(1, n))
    memory = slurm.memory_for_rank(settings.slurm, ranks_on_node=ranks_on_node, cpus=cpus)
    if memory is not None and n:
        memory //= n
    counts = comm.gather(n, root=0)
    local_image = None
    if image is not None:
        try:
            local_image = share_image(comm, MPI, rank, nodes, image, unpack=any(counts or [n]))
        except Exception as e:   # a bad image: say so on every rank, fail the job
            print("vinehpc pilot: rank %d: environment image %s: %s" % (rank, image, e), file=sys.stderr)
            return 2 if rank == 0 else 0
    MPI.Finalize()    # from here on, plain processes: a lost rank cannot abort the others

    if rank != 0:
        stop_workers(_start(n, meet, cores, memory, connect_timeout, local_image, meet["logs"]), timeout=None,
                     kill_after=5.0)
        return 0     # a lost worker is not a failed job

    from vinehpc.script import run_script       # rank 0 only: the other ranks never run the script
    contact = write_contact(run_dir, meet["contact"], meet["secret"], job_id=settings.slurm.job_id,
                            tls_fingerprint=fingerprint)
    total = sum(counts)
    sys.stderr.write("vinehpc pilot: %s, %d ranks on %d node(s), %d worker(s); manager at %s; run dir %s\n"
                     "vinehpc pilot: add workers from another allocation with: vinehpc worker --contact %s\n"
                     % (slurm.job_label(settings.slurm), size, len(set(nodes)), total, meet["address"], run_dir,
                        contact))
    ctx = PilotRun(lsock, meet["address"], meet["secret"], run_dir, settings, expected_workers=total,
                   grace=grace if grace is not None else settings.grace, tunnel=tunnel, ssl=pair)
    own = _start(n, meet, cores, memory, connect_timeout, local_image, meet["logs"])
    ctx.watcher = drain.Watcher(run_dir, drain_key, ctx.drain, job=settings.slurm.job_id, since=started)
    signal.signal(signal.SIGUSR1, ctx.on_walltime)
    while _EARLY:
        ctx.watcher.notify(_EARLY.popleft())
    ctx.watcher.start()     # acts on what already waits before the script makes its first manager
    if settings.progress != "never":
        ctx.progress.start()
    code = run_script(script, argv, ctx, sigterm=ctx.on_walltime)
    ctx.progress.stop()
    ctx.watcher.stop()
    released = ctx.release_workers()
    stop_workers(own, timeout=15, kill_after=5.0)
    lsock.close()
    try:
        os.unlink(contact)
    except OSError:
        pass
    ctx.progress.summary("run directory %s" % run_dir)
    if ctx.walltime is not None:
        sys.stderr.write("vinehpc pilot: stopped early (%s); completed tasks are recorded in %s.\n"
                         "vinehpc pilot: RESUMABLE: submit the same job again to run what is left.\n"
                         % (ctx.walltime, run_dir))
        return RESUMABLE
    log.info("released %d workers", released)
    return code


def _start(n, meet, cores, memory, connect_timeout, image, log_dir):
    """This rank's `n` workers; a pilot's worker exits when the manager's socket refuses it
    (the run is over), and reconnects otherwise (the script's next manager)."""
    return start_workers(n, meet["address"], meet["secret"], fingerprint=meet["tls"], cores=cores, memory=memory,
                         image=image,
                         connect_timeout=connect_timeout, exit_on_refused=True, log_dir=log_dir) if n else []
