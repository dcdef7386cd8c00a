"""Drain requests: how the walltime warning (or a user) asks a running manager to stop dispatching.

    vinehpc drain RUN_DIR [--grace S]

writes RUN_DIR/drain-request; the run's watcher thread (rank 0 of a pilot, or `vinehpc run`)
verifies it and calls Manager.drain(grace): no new tasks start, running ones get the grace,
and the run exits RESUMABLE (75).  jobscripts/vine.sh turns Slurm's walltime warning (USR1 to
the batch shell) into such a request instead of passing the signal through srun/mpiexec,
because a signal passed to a job step reaches every process of the step: the worker ranks,
the workers and the very tasks the grace is meant to let finish.

Why a file and not the manager's port: the request must wait when the run is not up yet (the
warning can come while the pilot starts, before any socket exists), and the run directory is
the one thing both vine.sh and the pilot know from the start.  It is authenticated because a
run directory may sit in a shared project directory:
  - the request is a regular file (not a symlink) owned by our uid, mode 0600;
  - it carries an HMAC-SHA256, with the run directory's key (RUN_DIR/drain-key, 0600, kept
    across resubmissions and made by whichever of the run and `vinehpc drain` comes first: the
    key must exist before the run does), over its fields, which name the run directory;
  - it names the Slurm job it is for (vine.sh passes its own), or, without one, it counts only
    for a run that had already started when it was made: a request left behind by an earlier
    job never drains the next one;
  - its nonce is recorded in RUN_DIR/drain-consumed when it is acted on, so the same request
    put back (a replay) is refused.
A refused request is logged and deleted.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import stat
import threading
import time

from .protocol import auth

REQUEST = "drain-request"
KEY = "drain-key"     # not RUN_DIR/secret: a pilot's workers authenticate with another (contact.json)
CONSUMED = "drain-consumed"
TERM_GRACE = 5.0      # SIGTERM means the end is near (scancel, preemption): at most this much grace
POLL = 0.2            # seconds between looks at the request file
log = logging.getLogger("vinehpc.drain")


class RequestRefused(ValueError):
    """A drain request that must not be acted on (the message says why)."""


def grace_for(why: str, requested, configured: float) -> float:
    """The grace a request gets: what it asks, else the run's; a TERM never more than TERM_GRACE."""
    grace = configured if requested is None else float(requested)
    return min(grace, TERM_GRACE) if why == "TERM" else grace


def _check_own_private(path: str, st) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise RequestRefused("%s is not a regular file" % path)
    if st.st_uid != os.geteuid():
        raise RequestRefused("%s belongs to uid %d, not to us (%d)" % (path, st.st_uid, os.geteuid()))
    if st.st_mode & 0o077:
        raise RequestRefused("%s has mode %o: others may read or write it (0600 needed)"
                             % (path, st.st_mode & 0o777))


def ensure_key(run_dir: str) -> str:
    """RUN_DIR/drain-key, made now if it does not exist (by link(): of two makers, one wins and both
    read the winner's key)."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, KEY)
    if not os.path.lexists(path):
        tmp = "%s.%d.tmp" % (path, os.getpid())
        auth.write_secret(tmp, auth.new_secret())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    return read_key(run_dir)


def read_key(run_dir: str) -> str:
    path = os.path.join(run_dir, KEY)
    _check_own_private(path, os.lstat(path))
    return auth.read_secret(path)


FIELDS = ("run_dir", "grace", "why", "job", "nonce", "created")


def _body(fields: dict) -> str:
    """What the HMAC covers: every field, in one canonical form."""
    return json.dumps(fields, sort_keys=True, separators=(",", ":"))


def write_request(run_dir: str, key: str, *, grace=None, why="user", job=None) -> dict:
    """Write RUN_DIR/drain-request atomically (0600) and return its fields."""
    run_dir = os.path.abspath(run_dir)
    fields = {"run_dir": run_dir, "grace": None if grace is None else float(grace), "why": str(why),
              "job": None if job in (None, "") else str(job), "nonce": auth.nonce(), "created": time.time()}
    path = os.path.join(run_dir, REQUEST)
    tmp = "%s.%s.tmp" % (path, fields["nonce"][:16])
    with auth.create_private(tmp) as f:
        json.dump(dict(fields, mac=auth.mac(key, "drain", fields["nonce"], _body(fields))), f)
    os.replace(tmp, path)
    return fields


def _well_formed(f: dict) -> bool:
    number = (int, float)
    return (isinstance(f["run_dir"], str) and isinstance(f["why"], str) and isinstance(f["nonce"], str)
            and isinstance(f["created"], number) and (f["grace"] is None or isinstance(f["grace"], number))
            and (f["job"] is None or isinstance(f["job"], str)))


def _consumed(run_dir: str) -> set:
    try:
        with open(os.path.join(run_dir, CONSUMED)) as f:
            return {line.strip() for line in f}
    except FileNotFoundError:
        return set()


def take_request(run_dir: str, key: str, *, job=None, since: float = 0.0):
    """The verified fields of RUN_DIR/drain-request, consumed (None when there is none).
    Raises RequestRefused for one that must not be acted on; it is deleted either way."""
    run_dir = os.path.abspath(run_dir)
    path = os.path.join(run_dir, REQUEST)
    taken = path + ".taken"
    try:
        os.rename(path, taken)      # ours alone now: a newer request lands beside it, not into it
    except FileNotFoundError:
        return None
    try:
        try:
            fd = os.open(taken, os.O_RDONLY | os.O_NOFOLLOW)     # a symlink fails here (ELOOP)
        except OSError as e:
            raise RequestRefused("%s: %s" % (path, e)) from None
        with os.fdopen(fd) as f:
            _check_own_private(path, os.fstat(f.fileno()))
            try:
                d = json.load(f)
                fields = {k: d[k] for k in FIELDS}
                if not _well_formed(fields):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                raise RequestRefused("%s is not a drain request" % path) from None
        if not auth.check(key, "drain", fields["nonce"], _body(fields), d.get("mac")):
            raise RequestRefused("%s: its HMAC does not match the run's key (%s)" % (path, os.path.join(run_dir, KEY)))
        if fields["run_dir"] != run_dir:
            raise RequestRefused("%s was made for %s" % (path, fields["run_dir"]))
        if fields["nonce"] in _consumed(run_dir):
            raise RequestRefused("%s was already acted on (a replay)" % path)
        if fields["job"] is not None and fields["job"] != (None if job is None else str(job)):
            raise RequestRefused("%s is for job %s, this run is %s" % (path, fields["job"], job or "no job"))
        if fields["job"] is None and not fields["created"] >= since:
            raise RequestRefused("%s was made before this run started (left from an earlier run)" % path)
        if fields["grace"] is not None and not fields["grace"] >= 0:
            raise RequestRefused("%s asks a negative grace" % path)
        fd = os.open(os.path.join(run_dir, CONSUMED), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (fields["nonce"] + "\n").encode())
        finally:
            os.close(fd)
        return fields
    finally:
        try:
            os.unlink(taken)
        except FileNotFoundError:
            pass


class Watcher:
    """A thread that acts on RUN_DIR/drain-request and on signals handed to it: each accepted
    request and each signal calls on_drain(grace or None, why) (a run that already drains keeps
    its first grace)."""

    def __init__(self, run_dir: str, key: str, on_drain, *, job=None, since: float | None = None,
                 poll: float = POLL):
        self.run_dir = os.path.abspath(run_dir)
        self.key = key
        self.on_drain = on_drain
        self.job = job
        self.since = time.time() if since is None else since
        self.poll = poll
        self.signals = collections.deque()       # appended by signal handlers: nothing else there
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vinehpc-drain", daemon=True)

    def start(self) -> "Watcher":
        """A request or signal that is already waiting is acted on here, before start() returns
        (a pilot then drains its first manager at once: nothing runs)."""
        self.check()
        self._thread.start()
        return self

    def notify(self, why: str) -> None:
        """From a signal handler: acted on by the thread (a handler must not take locks)."""
        self.signals.append(why)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(5)

    def check(self) -> None:
        """One look: pending signals, then the request file."""
        while self.signals:
            self.on_drain(None, self.signals.popleft())
        try:
            req = take_request(self.run_dir, self.key, job=self.job, since=self.since)
        except (RequestRefused, OSError) as e:
            log.warning("drain request refused and deleted: %s", e)
            return
        if req is not None:
            self.on_drain(req["grace"], req["why"])

    def _run(self):
        while not self._stop.wait(self.poll):
            try:
                self.check()
            except Exception:    # a failing callback must not end the watching
                log.exception("drain watcher")


def cli(run_dir: str, *, grace=None, job=None, why="user") -> int:
    """`vinehpc drain`: write the request; say where it went and who will act on it."""
    import sys
    if grace is not None and not grace >= 0:
        print("vinehpc drain: --grace must be a non-negative number of seconds", file=sys.stderr)
        return 2
    try:
        req = write_request(run_dir, ensure_key(run_dir), grace=grace, why=why, job=job)
    except (OSError, ValueError) as e:
        print("vinehpc drain: %s" % e, file=sys.stderr)
        return 2
    who = ("job %s's manager (now, or as soon as it is up)" % req["job"] if req["job"]
           else "the run going on there (a run that starts later ignores it)")
    print("vinehpc drain: requested in %s; %s stops dispatching and gives running tasks %s"
          % (os.path.join(req["run_dir"], REQUEST), who,
             "the run's grace" if grace is None else "%g s" % grace))
    return 0
