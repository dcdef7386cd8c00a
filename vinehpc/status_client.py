"""`vinehpc status [RUN_DIR | contact.json | HOST:PORT]`: ask a running manager for its figures,
or read them from the run directory's log once it has gone.

The manager is asked over its own port with the STATUS handshake (vinehpc/protocol/handshake.py):
the client proves it knows the run's secret before the manager answers anything, so a stranger
learns nothing.  It then sends `status` messages and gets `snapshot`s back (one connection for a
whole --watch).  When the manager does not answer, the run directory's transactions.jsonl is
replayed (vinehpc/status.py: the same figures, as the log has them) and the view says so.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time

from .protocol import ProtocolError, auth, handshake, messages, tls
from .status import from_log

TIMEOUT = 10.0


class Refused(Exception):
    """The manager did not accept our proof (wrong secret), or did not prove its own."""


class Unreachable(Exception):
    """No manager answers at that address."""


# ---------------------------------------------------------------- where, and with which secret
def locate(target, secret_file=None, env_secret=None, run_root=None, read_contact=None):
    """(address, secret, run_dir, TLS fingerprint or None) for a RUN_DIR, a contact.json or
    HOST:PORT (None: the newest run under run_root).  read_contact(path) -> (address, secret,
    fingerprint): a pilot's contact file reader (launcher.contact's read_contact_tls, given by the
    command line: the engine does not import launchers).  Raises ValueError saying what is missing."""
    if target is None:
        target = _newest(run_root)
    run_dir = address = secret = fingerprint = None
    if os.path.isdir(target):
        run_dir = os.path.abspath(target)
        contact = os.path.join(run_dir, "contact.json")
        if os.path.exists(contact) and read_contact is not None:
            address, secret, fingerprint = read_contact(contact)
        else:
            address = _logged_address(run_dir)
            if os.path.exists(os.path.join(run_dir, "secret")):
                secret = auth.read_secret(os.path.join(run_dir, "secret"))
            if os.path.exists(os.path.join(run_dir, tls.FINGERPRINT_FILE)):
                with open(os.path.join(run_dir, tls.FINGERPRINT_FILE)) as f:
                    fingerprint = f.read().strip() or None
    elif os.path.isfile(target) and read_contact is not None:
        run_dir = os.path.dirname(os.path.abspath(target))
        address, secret, fingerprint = read_contact(target)
    elif ":" in target:
        address = target
    else:
        raise ValueError("%r is neither a run directory, a contact file nor HOST:PORT" % target)
    if secret_file:
        secret = auth.read_secret(secret_file)
    secret = secret or env_secret
    if address is not None and not secret:
        raise ValueError("no secret for %s: give --secret-file FILE (RUN_DIR/secret) or set VINEHPC_SECRET" % address)
    return address, secret, run_dir, fingerprint


def _newest(root):
    try:
        runs = [os.path.join(root, d) for d in os.listdir(root)]
    except OSError:
        runs = []
    runs = [d for d in runs if os.path.isfile(os.path.join(d, "transactions.jsonl"))]
    if not runs:
        raise ValueError("no run directory under %s: give RUN_DIR, RUN_DIR/contact.json or HOST:PORT" % root)
    return max(runs, key=lambda d: os.path.getmtime(os.path.join(d, "transactions.jsonl")))


def _logged_address(run_dir):
    """The address of the run's last manager, from its "manager started" record (None: none)."""
    address = None
    try:
        with open(os.path.join(run_dir, "transactions.jsonl"), "rb") as f:
            for line in f:
                if b'"manager started"' in line:
                    try:
                        address = json.loads(line).get("address")
                    except ValueError:
                        pass
    except OSError:
        pass
    return address


# ---------------------------------------------------------------- asking the manager
class Session:
    """One authenticated connection to a manager; `ask()` returns a snapshot."""

    def __init__(self, address, secret, timeout=TIMEOUT, fingerprint=None):
        """`fingerprint`: the manager's TLS certificate's (a manager with ssl), else None."""
        host, _, port = address.rpartition(":")
        try:
            self.sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
        except (OSError, ValueError) as e:
            raise Unreachable("no manager answers at %s: %s" % (address, e)) from None
        self.address = address
        hs = handshake.Answerer(secret, handshake.STATUS, tls=fingerprint is not None)
        try:
            self._until(hs.receive_data, b"")
            if hs.state == "tls":
                self.sock = tls.wrap_client(self.sock, fingerprint, "the manager at %s" % address)
                hs.tls_started()
                self._until(hs.receive_data, b"")
            self.sock.sendall(hs.auth())
            self._until(hs.receive_data, b"")
        except handshake.AuthFailed:
            self.close()
            raise Refused("the manager at %s did not prove it knows the secret" % address) from None
        except tls.TLSError as e:
            self.close()
            raise Refused(str(e).replace(tls.HOW_TO_GIVE, "give --tls-fingerprint (RUN_DIR/%s) or the run "
                                                         "directory" % tls.FINGERPRINT_FILE)) from None
        except (ConnectionError, EOFError):
            self.close()
            raise Refused("the manager at %s refused us (wrong secret?)" % address) from None
        except (OSError, ProtocolError) as e:
            self.close()
            raise Unreachable("no vinehpc manager answers at %s: %s" % (address, e)) from None
        self.dec = messages.decoder()
        self.dec.push(hs.rest)

    def _until(self, step, data):
        while True:
            m = step(data)
            if m is not None:
                return m
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("connection closed")

    def ask(self) -> dict:
        self.sock.sendall(messages.encode_bytes(messages.Status()))
        while True:
            m = self.dec.next_message()
            if m is not None:
                break
            data = self.sock.recv(1 << 20)
            if not data:
                raise EOFError("the manager closed the connection")
            self.dec.push(data)
        snap = json.loads(messages.decode(*m).data)
        if type(snap) is not dict:
            raise ProtocolError("a snapshot that is not an object")
        return snap

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def snapshot(address, secret, run_dir, fingerprint=None):
    """The manager's snapshot, or the log's when it does not answer (Refused is raised)."""
    why = "no manager address in the log"
    if address is not None:
        try:
            s = Session(address, secret, fingerprint=fingerprint)
            try:
                return s.ask()
            finally:
                s.close()
        except (Unreachable, EOFError, OSError) as e:
            why = str(e)
    if run_dir is None:
        raise Unreachable(why)
    return from_log(run_dir, why)


# ---------------------------------------------------------------- showing
def _dur(s):
    if (s or 0) < 60:
        return "%.1f s" % (s or 0)
    s = int(s)
    return "%dh%02dm%02ds" % (s // 3600, s // 60 % 60, s % 60) if s >= 3600 else "%dm%02ds" % (s // 60, s % 60)


def _size(n):
    n = float(n or 0)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return ("%d %s" if unit == "B" else "%.1f %s") % (n, unit)
        n /= 1000.0


def _clock(t):
    return time.strftime("%H:%M:%S", time.localtime(t)) if t else "?"


def _table(head, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    return ["  " + "  ".join(str(x).rjust(w) if i else str(x).ljust(w) for i, (x, w) in enumerate(zip(r, widths)))
            for r in [head] + rows]


def render(snap) -> str:
    c = snap["counts"]
    title = "vinehpc status  %s%s" % (snap.get("name") + "  " if snap.get("name") else "", snap.get("address") or "")
    if snap.get("ended"):
        state = "THE RUN HAS ENDED (manager stopped at %s, after %s); figures from its log" % (
            _clock(snap.get("ended_at")), _dur(c["elapsed"]))
    elif snap.get("source") == "log":
        state = ("the manager is not answering (%s); figures from its log up to %s (it may have crashed)"
                 % (snap.get("why"), _clock(snap.get("last_record"))))
    else:
        state = "running for %s%s" % (_dur(c["elapsed"]), ", DRAINING (walltime)" if snap.get("draining") else "")
    out = [title, state, ""]
    out.append("tasks      submitted %d   waiting %d   running %d (on workers %d)   done %d (succeeded %d, failed %d, "
               "cancelled %d)   retried %d" % (c["tasks_submitted"], c["tasks_waiting"], c["tasks_running"],
                                              c.get("tasks_on_workers", c["tasks_running"]), c["tasks_done"],
                                              c["tasks_succeeded"], c["tasks_failed"], c["tasks_cancelled"],
                                              c["tasks_retried"]))
    out.append("throughput now %.1f tasks/s (last minute), average %.1f tasks/s"
               % (c["tasks_per_second"], c["tasks_per_second_average"]))
    out.append("workers    connected %d (busy %d, idle %d)   cores %d of %d busy   memory %s   joined %d   lost %d"
               % (c["workers_connected"], c["workers_busy"], c["workers_idle"], c["committed_cores"], c["total_cores"],
                  _size((c["total_memory"] or 0) * 1e6), c["workers_joined"], c["workers_lost"]))
    tr = snap.get("transfers")
    out.append("transfers  %ssent %s (%d files), received %s"
               % ("in flight: %d out, %d in   " % (tr["outgoing"], tr["incoming"]) if tr else "",
                  _size(c["bytes_sent"]), c["files_sent"], "?" if c["bytes_received"] is None
                  else _size(c["bytes_received"])))
    o = snap.get("oldest_running")
    if o:
        out.append("oldest     task %s (%s) on worker %s (%s), running for %s"
                   % (o["task"], o["category"], o["worker"], o["host"], _dur(o["running_for"])))
    if snap["nodes"]:
        out += ["", "nodes"] + _table(("host", "workers", "busy", "cores", "busy cores", "memory", "tasks"),
                                      [(n["host"], n["workers"], n["busy"], n["cores"], n["busy_cores"],
                                        _size(n["memory"] * 1e6), n["tasks"]) for n in snap["nodes"]])
    for what in ("categories", "tags"):
        groups = snap.get(what) or {}
        if groups:
            out += ["", what] + _table(("name", "submitted", "waiting", "running", "done", "failed", "retried"),
                                       [(k, g["submitted"], g["waiting"], g["running"], g["done"], g["failed"],
                                         g["retried"]) for k, g in groups.items()])
    if snap["workers_lost"]:
        out += ["", "workers lost: %d (%s)" % (c["workers_lost"], "; ".join(
            "%d x %s" % (n, why) for why, n in snap["lost_reasons"].items()))]
        out += ["  %s worker %s on %s: %s (%d task(s) requeued)" % (_clock(w["time"]), w["worker"], w["host"],
                                                                  w["reason"], w["tasks"])
                for w in snap["workers_lost"][-5:]]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- the command
def main(target, *, as_json=False, watch=False, interval=2.0, count=None, secret_file=None, env_secret=None,
         run_root=None, read_contact=None, out=None, tls_fingerprint=None) -> int:
    out = out or sys.stdout
    try:
        address, secret, run_dir, fingerprint = locate(target, secret_file, env_secret, run_root, read_contact)
        fingerprint = tls_fingerprint or fingerprint
    except (ValueError, OSError, KeyError) as e:
        print("vinehpc status: %s" % e, file=sys.stderr)
        return 2
    show = (lambda s: json.dumps(s, indent=1, sort_keys=True) + "\n") if as_json else render
    if not watch:
        try:
            out.write(show(snapshot(address, secret, run_dir, fingerprint)))
        except Refused as e:
            print("vinehpc status: %s" % e, file=sys.stderr)
            return 3
        except Unreachable as e:
            print("vinehpc status: %s" % e, file=sys.stderr)
            return 1
        return 0
    return _watch(address, secret, run_dir, show, interval, count, out, fingerprint)


def _watch(address, secret, run_dir, show, interval, count, out, fingerprint=None) -> int:
    """Redraw in place on a terminal (cursor home, clear, hidden cursor), else one view after the
    other; `count` views, or until the manager is gone (its log's view is the last), or Ctrl-C."""
    tty = out.isatty()
    session = None
    shown = 0
    if tty:
        out.write("\033[?25l")          # hide the cursor while redrawing
    try:
        while count is None or shown < count:
            snap = None
            if session is None and address is not None:
                try:
                    session = Session(address, secret, fingerprint=fingerprint)
                except Refused as e:
                    print("vinehpc status: %s" % e, file=sys.stderr)
                    return 3
                except Unreachable:
                    session = None
            if session is not None:
                try:
                    snap = session.ask()
                except (OSError, EOFError, ProtocolError, ValueError):
                    session.close()
                    session = address = None      # gone: the log tells the rest
            last = snap is None
            if last:
                if run_dir is None:
                    print("vinehpc status: no manager answers at %s" % address, file=sys.stderr)
                    return 1
                snap = from_log(run_dir, "the manager is gone")
            text = show(snap)
            out.write("\033[H\033[2J" + text.replace("\n", "\033[K\n") if tty else text + "\n")
            out.flush()
            shown += 1
            if last or (count is not None and shown >= count):
                break
            time.sleep(interval)
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        if session is not None:
            session.close()
        if tty:
            out.write("\033[?25h")
            out.flush()
