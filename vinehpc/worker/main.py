"""The worker: connects to a manager (and again to the next one, for a pilot), authenticates,
then serves it with the event loop (loop.py) over the state machine (state.py).

A task's life here: received -> inputs present (URL fetched if needed) -> queued until
cores/memory/disk/gpus fit -> running in its sandbox -> outputs collected -> result sent.
"""
from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import time

from ..comm import Closed, Connection, unix_address
from ..comm.peer import FileServer, drive
from ..comm.receive import remove_path
from ..protocol import ProtocolError, handshake, tls, wire
from ..config import Settings      # the environment is read once, in Settings
from . import resources
from .logfile import WorkerLog
from .loop import Loop, ManagerGone, SessionOver
from .workdir import make as make_workdir, remove_stale

log = logging.getLogger("vinehpc.worker")


class Rejected(Exception):
    """The manager closed the connection once it had our secret: it did not accept it."""


class Worker(Loop):
    def __init__(self, address: str, secret: str, *, cores=None, memory=None, disk=None, gpus=None,
                 workdir=None, connect_timeout=60.0, reconnect=True, exit_on_refused=False, image=None, settings=None,
                 log_dir=None, tls_fingerprint=None, unix=None):
        """tls_fingerprint: the manager's TLS certificate's (protocol/tls.py); given, the worker
        speaks only TLS, to a manager with that certificate; None: only plaintext.  unix: the
        path of the manager's Unix socket, for a worker on its machine (connections go there
        instead of to `address`, which stays the manager's address for the tunnel and the logs)."""
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError("manager address must be HOST:PORT, got %r" % address)
        self.addr = (host.strip("[]"), int(port))
        self.unix = unix
        self.secret = secret
        self.fingerprint = tls.normalize_fingerprint(tls_fingerprint) if tls_fingerprint else None
        self.own_workdir = workdir is None
        settings = settings or Settings.from_env()     # given by `vinehpc worker`
        self.claim = None        # the lock on our own directory, held for our life (workdir.py)
        if workdir is None:
            stale = remove_stale(settings.worker_dir)     # left by workers killed with -9 on this node
            workdir, self.claim = make_workdir(settings.worker_dir)
        else:
            stale = ()
        os.makedirs(workdir, exist_ok=True)
        ids = resources.gpu_ids()
        if gpus is not None:                     # given: those of the detected devices, else 0..gpus-1
            ids = ids[:gpus] if len(ids) >= gpus else [str(i) for i in range(gpus)]
        total = resources.detect(workdir, cores=cores, memory=memory, disk=disk, gpus=len(ids))
        default_image = None    # --image: every task without its own image runs in this one
        if image is not None:
            from sysimage_tools.deploy import ensure_local
            from sysimage_tools.image import ImageError
            try:
                default_image = ensure_local(image)
            except ImageError as e:
                raise ValueError("environment image %s: %s" % (image, e)) from None
        self.connect_timeout = connect_timeout
        self.exit_on_refused = exit_on_refused   # a pilot's worker: a refused connection means the run is over
        self.refused = False
        self.connect_error = None
        self.proxy = None          # the local tunnel proxy (userlevel_net.proxy), when the manager offers one
        self.proxy_egress = None
        self.hostname = settings.slurm.node_name or socket.gethostname()   # a Slurm node's name
        super().__init__(workdir=workdir, total=total, gpu_ids=ids, hostname=self.hostname, reconnect=reconnect,
                         default_image=default_image)
        self.secret = secret
        self.stall = settings.transfer_stall
        # its cache, served to the run's other workers (the manager says who fetches what from whom)
        self.files_server = FileServer(secret, self.serve_path, self.notice, self.cache.arriving)
        # log_dir: where the log is copied when the worker exits (its workdir may be removed then)
        self.log = WorkerLog(workdir, log_dir, "%s-%d" % (self.hostname, os.getpid()))
        log.info("worker pid %d on %s for %s:%d: %s, workdir %s", os.getpid(), self.hostname, self.addr[0],
                 self.addr[1], ", ".join("%s %s" % kv for kv in sorted(total.items())), workdir)
        for p in stale:
            log.info("removed %s, left by a worker that was killed", p)

    # ---------------------------------------------------------------- life
    def run(self) -> int:
        """Serve managers until told to exit or the manager is unreachable. Returns an exit code."""
        try:
            served = False
            rejected = failed = 0
            while not self.exit_requested:
                sock = self._connect()
                if sock is None:
                    if self.refused:
                        log.info("the manager at %s:%d no longer listens: the run is over", *self.addr)
                        return 0
                    if served:
                        log.info("manager %s:%d is gone; exiting", *self.addr)
                        return 0
                    log.error("could not reach the manager at %s:%d within %.0f s (--connect-timeout): %s",
                              self.addr[0], self.addr[1], self.connect_timeout, self.connect_error)
                    return 1
                try:
                    self._handshake(sock)
                except (PermissionError, tls.TLSError) as e:     # never heals: say why and stop
                    log.error("%s", e)
                    return 2
                except Rejected as e:
                    # a wrong secret never heals; twice in a row rules out a manager that was just stopping
                    sock.close()
                    rejected += 1
                    if rejected >= 2:
                        log.error("%s: the secret is wrong (retrying will not help); give the run's secret with "
                                  "--secret-file RUN_DIR/secret or --contact RUN_DIR/contact.json", e)
                        return 2
                    time.sleep(0.5)
                    continue
                except (OSError, ProtocolError, Closed) as e:
                    # before our secret was checked: a manager stopping or not yet up; connecting again tells
                    log.info("handshake with %s:%d failed: %s", self.addr[0], self.addr[1], e)
                    sock.close()
                    failed += 1
                    if not self.reconnect and failed >= 3:
                        log.warning("handshake with %s:%d failed: %s", self.addr[0], self.addr[1], e)
                        return 1
                    time.sleep(1.0 if self.reconnect else 0.2)
                    continue
                served = True
                rejected = failed = 0
                try:
                    self._serve()
                except SessionOver as e:
                    log.info("session over (%s); waiting for the next manager", e)
                except (ManagerGone, Closed, ProtocolError) as e:
                    log.warning("lost the manager: %s", e)
                finally:
                    self._end_session()
                if not self.reconnect:
                    break
            return 0
        finally:
            self.shutdown()

    def _connect(self):
        """A connection to the manager, retried with backoff for connect_timeout seconds; None if
        none (the last reason in connect_error). The reason is said once, at the first failure."""
        deadline = time.monotonic() + self.connect_timeout
        delay = 0.05
        said = False
        while True:
            try:
                if self.unix is None:
                    return socket.create_connection(self.addr, timeout=10)
                return _connect_unix(self.unix)
            except (ConnectionRefusedError, FileNotFoundError) as e:
                if self.exit_on_refused:
                    self.refused = True
                    return None
                why = ("connection refused (nothing listens on port %d there)" % self.addr[1] if self.unix is None
                       else "nothing listens on %s: %s" % (self.unix, e.strerror))
            except socket.gaierror as e:
                why = "cannot resolve %r: %s" % (self.addr[0], e.strerror)
            except OSError as e:
                why = e.strerror or str(e)
            self.connect_error = why
            if time.monotonic() + delay > deadline:
                return None
            if not said:
                log.warning("cannot reach the manager at %s:%d: %s; retrying for up to %.0f s", self.addr[0],
                            self.addr[1], why, max(0.0, deadline - time.monotonic()))
                said = True
            time.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _handshake(self, sock):
        hs = handshake.Answerer(self.secret, handshake.WORKER, tls=self.fingerprint is not None)

        def step():
            return drive(sock, hs, Closed, "manager closed the connection during the handshake (wrong secret?)")

        # a pilot's workers may connect before the script creates its Manager: wait for the hello
        sock.settimeout(max(15.0, self.connect_timeout))
        step()
        sock.settimeout(15)
        if hs.state == "tls":       # the manager announced TLS: its certificate must be the run's
            sock = tls.wrap_client(sock, self.fingerprint, "the manager at %s:%d" % self.addr)
            hs.tls_started()
            step()
        sock.sendall(hs.auth())
        try:
            welcome = step()
        except (Closed, ConnectionResetError):
            raise Rejected("the manager at %s:%d closed the connection after checking our secret" % self.addr) \
                from None
        except handshake.AuthFailed:
            raise PermissionError("the manager at %s:%d did not prove it knows the secret: refusing to run its tasks"
                                  % self.addr) from None
        self._tunnel(welcome.tunnel)
        if welcome.keepalive:
            self.ka = (float(welcome.keepalive[0]), float(welcome.keepalive[1]))
        conn = Connection(sock, hs.rest)       # with whatever followed the welcome
        self.conn = conn
        info = dict(self.total, host=self.hostname, pid=os.getpid(), cached=sorted(self.cache.entries),
                    workdir=self.workdir, version=wire.VERSION, log=self.log.path, port=self.files_server.port)
        log.info("joined the manager at %s:%d as worker %s", self.addr[0], self.addr[1], welcome.wid)
        conn.send("info", info)
        self.sel.register(sock, selectors.EVENT_READ, ("manager", None))
        self._writing = False
        self.last_recv = time.monotonic()

    def _tunnel(self, info):
        """The manager offers a way out: start (or keep) our local proxy and give tasks its variables."""
        if not info:
            self.exec.task_env = {}
            return
        egress = info.get("egress") or "%s:%d" % (self.addr[0], int(info["port"]))
        if self.proxy is None or self.proxy_egress != egress:
            if self.proxy is not None:
                self.proxy.stop()
            from userlevel_net.proxy import start_proxy   # only workers that tunnel need it
            self.proxy = start_proxy(egress, self.secret, no_proxy=[self.addr[0], self.hostname],
                                     log=os.path.join(self.workdir, "tunnel-proxy.log"))
            self.proxy_egress = egress
        self.exec.task_env = dict(self.proxy.env)

    def shutdown(self):
        self.close()
        self.files_server.close()
        if self.proxy is not None:
            self.proxy.stop()
        log.info("worker exits")
        self.log.close()
        if self.own_workdir:
            remove_path(self.workdir)       # (read-only cache entries too)
            self.claim.close()


def _connect_unix(path):
    """`path`: a Unix socket's path, or "@NAME" for one in Linux's abstract namespace."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(10)
        s.connect(unix_address(path))
    except BaseException:
        s.close()
        raise
    return s


def main(address, secret, **kw) -> int:
    signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(SystemExit(143)))
    signal.signal(signal.SIGUSR1, lambda *a: None)   # a pilot's walltime warning is for the manager
    w = Worker(address, secret, **kw)
    return w.run()
