"""The egress: the side of the tunnel that has the network (the manager's node or a gateway).

Every stream is its own TCP connection from a worker's proxy.  The egress proves and checks
the run's secret (see _relay's docstring for the handshake), enforces the allow list,
resolves the destination's name itself (remote DNS), connects, and then relays raw bytes.
Threads: one accept thread, two threads per open stream (one per direction, moving bytes
with splice(2): no copy through Python).

    eg = Egress(secret, host="0.0.0.0", port=0, allow=["*.cern.ch:1094", "10.0.0.0/8"]).start()
    eg.port, eg.stats
    eg.stop()

Allow patterns (default: allow all): HOST, HOST:PORT, HOST:LO-HI, HOST:*, [V6]:PORT, where
HOST is a shell glob matched (case-insensitively) against the requested name *and* against
each address it resolves to, or a CIDR network (10.0.0.0/8, fd00::/8) matched against the
addresses.  Only allowed addresses are connected to.
"""
from __future__ import annotations

import errno as _errno
import fnmatch
import ipaddress
import logging
import socket
import threading

from vinehpc.protocol import auth, wire

from ._relay import (CONNECT_TIMEOUT, HANDSHAKE_TIMEOUT, ROLE_EGRESS, check_proxy_mac, read_message,
                     relay, tune)

log = logging.getLogger("vinehpc.tunnel.egress")

MAX_STREAMS = 4096


class Rule:
    """One allow pattern (see the module docstring)."""

    def __init__(self, pattern: str):
        self.pattern = pattern
        p = pattern.strip()
        port = None
        if p.startswith("["):
            host, _, rest = p[1:].partition("]")
            if rest:
                if not rest.startswith(":"):
                    raise ValueError("allow pattern %r: expected [V6]:PORT" % pattern)
                port = rest[1:]
        elif p.count(":") == 1:
            host, port = p.split(":")
        else:
            host = p                      # a name, or a v6 address/network without a port
        self.lo, self.hi = 0, 65535
        if port not in (None, "", "*"):
            lo, _, hi = port.partition("-")
            try:
                self.lo, self.hi = int(lo), int(hi or lo)
            except ValueError:
                raise ValueError("allow pattern %r: bad port %r" % (pattern, port)) from None
        if not host:
            raise ValueError("allow pattern %r: no host" % pattern)
        self.net = None
        if "/" in host:
            try:
                self.net = ipaddress.ip_network(host, strict=False)
            except ValueError:
                raise ValueError("allow pattern %r: bad network %r" % (pattern, host)) from None
        self.glob = host.lower()

    def port_ok(self, port: int) -> bool:
        return self.lo <= port <= self.hi

    def name_ok(self, host: str) -> bool:
        return self.net is None and fnmatch.fnmatchcase(host.lower(), self.glob)

    def addr_ok(self, ip: str) -> bool:
        if self.net is not None:
            try:
                return ipaddress.ip_address(ip) in self.net
            except ValueError:
                return False
        return fnmatch.fnmatchcase(ip.lower(), self.glob)

    def __repr__(self):
        return "Rule(%r)" % self.pattern


class Policy:
    def __init__(self, allow):
        self.rules = None if allow is None else [Rule(p) for p in allow]

    def may_try(self, host: str, port: int) -> bool:
        """Before resolving: could any rule allow this destination? (no DNS for a sure no)"""
        if self.rules is None:
            return True
        return any(r.port_ok(port) and (r.name_ok(host) or r.net is not None or _may_match_address(r.glob))
                   for r in self.rules)

    def allowed(self, host: str, port: int, ip: str) -> bool:
        if self.rules is None:
            return True
        return any(r.port_ok(port) and (r.name_ok(host) or r.addr_ok(ip)) for r in self.rules)


_ADDR_CHARS = frozenset("0123456789abcdef.:*?[]!-")


def _may_match_address(glob: str) -> bool:
    """Could this glob match an IP address (else it can only match names)?"""
    return set(glob) <= _ADDR_CHARS


class Egress:
    """Opens the real outbound connections for authenticated proxies."""

    def __init__(self, secret: str, *, host: str = "0.0.0.0", port: int = 0, allow: list | None = None,
                 connect_timeout: float = CONNECT_TIMEOUT, handshake_timeout: float = HANDSHAKE_TIMEOUT,
                 max_streams: int = MAX_STREAMS):
        if not secret:
            raise ValueError("Egress needs the run's secret")
        self.secret = secret
        self.host = host
        self.port = port
        self.policy = Policy(allow)        # raises ValueError on a bad pattern, before anything starts
        self.connect_timeout = connect_timeout
        self.handshake_timeout = handshake_timeout
        self.max_streams = max_streams
        self._lock = threading.Lock()
        self._stats = dict(accepted=0, opened=0, active=0, denied=0, refused=0, failed=0, auth_failed=0,
                           bytes_out=0, bytes_in=0)
        self._socks = set()                # every socket we own while a stream runs
        self._sock = None
        self._thread = None
        self._stopping = False

    # ------------------------------------------------------------------------- lifecycle
    def start(self) -> "Egress":
        fam = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((self.host, self.port))
            s.listen(1024)
        except BaseException:
            s.close()
            raise
        self._sock = s
        self.port = s.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name="egress-accept", daemon=True)
        self._thread.start()
        log.info("egress listening on %s:%d (allow: %s)", self.host, self.port,
                 "all" if self.policy.rules is None else [r.pattern for r in self.policy.rules])
        return self

    def stop(self) -> None:
        """Stop accepting and tear down every open stream (their threads end on their own)."""
        self._stopping = True
        s, self._sock = self._sock, None
        if s is not None:
            try:
                s.shutdown(socket.SHUT_RDWR)   # wakes accept()
            except OSError:
                pass
            s.close()
        with self._lock:
            socks = list(self._socks)
        for c in socks:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)

    def __enter__(self):
        return self.start() if self._sock is None else self

    def __exit__(self, *exc):
        self.stop()

    @property
    def stats(self) -> dict:
        with self._lock:
            return dict(self._stats)

    def _count(self, key, n=1):
        with self._lock:
            self._stats[key] += n

    # ------------------------------------------------------------------------- streams
    def _accept_loop(self):
        listener = self._sock
        while not self._stopping:
            try:
                c, peer = listener.accept()
            except OSError as e:
                if self._stopping or e.errno in (_errno.EBADF, _errno.EINVAL):
                    return
                if e.errno in (_errno.EMFILE, _errno.ENFILE, _errno.ENOBUFS, _errno.ENOMEM):
                    log.warning("accept: %s (out of descriptors/memory); backing off", e)
                    threading.Event().wait(0.1)
                continue
            with self._lock:
                self._stats["accepted"] += 1
                busy = self._stats["active"] >= self.max_streams
                if not busy:
                    self._stats["active"] += 1
                    self._socks.add(c)
            if busy:
                log.warning("stream from %s:%d refused: %d streams open (max_streams)", peer[0], peer[1],
                            self.max_streams)
                c.close()
                self._count("failed")
                continue
            try:
                threading.Thread(target=self._stream, args=(c, peer), name="egress-stream", daemon=True).start()
            except RuntimeError:            # cannot start a thread
                self._forget(c)
                c.close()
                self._count("failed")

    def _forget(self, *socks):
        with self._lock:
            for s in socks:
                if s in self._socks:
                    self._socks.discard(s)
        # (active is decremented by the caller exactly once)

    def _stream(self, c, peer):
        d = None
        try:
            d = self._handshake(c, peer)
            if d is None:
                return
            sock, dest = d
            out, back = relay(c, sock)
            with self._lock:
                self._stats["bytes_out"] += out
                self._stats["bytes_in"] += back
                self._socks.discard(sock)
            log.debug("stream %s:%d -> %s closed: %d bytes out, %d in", peer[0], peer[1], dest, out, back)
        except Exception:
            log.exception("stream from %s:%d", peer[0], peer[1])
        finally:
            c.close()
            if d is not None:
                d[0].close()
            with self._lock:
                self._socks.discard(c)
                if d is not None:
                    self._socks.discard(d[0])
                self._stats["active"] -= 1

    def _handshake(self, c, peer):
        """Returns (destination socket, "host:port") for an open stream, None otherwise."""
        c.settimeout(self.handshake_timeout)
        tune(c)
        ne = auth.nonce()
        dec = wire.Decoder(max_ctl=wire.PREAUTH_MAX_CTL, allow_frames=False)
        try:
            c.sendall(wire.encode_bytes("hello", {"v": wire.VERSION, "nonce": ne, "role": "egress"}))
            m = read_message(c, dec)
        except (OSError, wire.ProtocolError) as e:
            log.warning("stream from %s:%d: handshake failed: %s", peer[0], peer[1], e)
            self._count("auth_failed")
            return None
        if m is None or m[0] != "auth":
            log.warning("stream from %s:%d: %s before authentication; closed", peer[0], peer[1],
                        "EOF" if m is None else "%r" % m[0])
            self._count("auth_failed")
            return None
        ctl = m[1]
        np_ = ctl.get("nonce")
        dest = ctl.get("dest") if isinstance(ctl.get("dest"), dict) else {}
        host, port = dest.get("host"), dest.get("port")
        if not (isinstance(np_, str) and len(np_) <= 256 and isinstance(host, str) and 0 < len(host) <= 255
                and isinstance(port, int) and not isinstance(port, bool) and 0 < port <= 65535
                and check_proxy_mac(self.secret, ne, np_, host, port, ctl.get("mac"))):
            log.warning("stream from %s:%d: authentication failed (wrong secret); closed", peer[0], peer[1])
            self._count("auth_failed")
            return None
        where = "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)
        mac = auth.mac(self.secret, ROLE_EGRESS, np_, ne)

        def fail(kind, detail, err=None, stat="failed"):
            self._count(stat)
            log.info("stream from %s:%d to %s: %s (%s)", peer[0], peer[1], where, kind, detail)
            reply = {"mac": mac, "ok": False, "error": kind, "detail": detail}
            if err is not None:
                reply["errno"] = err
            try:
                c.sendall(wire.encode_bytes("welcome", reply))
            except OSError:
                pass
            return None

        if not self.policy.may_try(host, port):
            return fail("denied", "%s is not in the egress's allow list" % where, stat="denied")
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            return fail("dns", "cannot resolve %s: %s" % (host, e.strerror or e))
        except (OSError, UnicodeError) as e:
            return fail("dns", "cannot resolve %s: %s" % (host, e))
        infos = [i for i in infos if self.policy.allowed(host, port, i[4][0])]
        if not infos:
            return fail("denied", "%s is not in the egress's allow list" % where, stat="denied")
        err = None
        for fam, typ, proto, _, addr in infos:
            s = socket.socket(fam, typ, proto)
            with self._lock:
                self._socks.add(s)
            try:
                s.settimeout(self.connect_timeout)
                s.connect(addr)
            except OSError as e:
                with self._lock:
                    self._socks.discard(s)
                s.close()
                err = e
                if self._stopping:
                    break
                continue
            try:
                c.sendall(wire.encode_bytes("welcome", {"mac": mac, "ok": True}))
            except OSError as e:
                log.info("stream from %s:%d: proxy went away: %s", peer[0], peer[1], e)
                with self._lock:
                    self._socks.discard(s)
                s.close()
                return None
            self._count("opened")
            if dec.buf:              # the proxy sends nothing before the welcome, but be exact
                try:
                    s.sendall(bytes(dec.buf))
                except OSError:
                    pass
            return s, where
        e = err
        if isinstance(e, (socket.timeout, TimeoutError)):
            return fail("timeout", "connect to %s timed out after %.0f s" % (where, self.connect_timeout),
                        _errno.ETIMEDOUT)
        if isinstance(e, ConnectionRefusedError):
            return fail("refused", "connection to %s refused" % where, e.errno, stat="refused")
        if e is not None and e.errno in (_errno.ENETUNREACH, _errno.EHOSTUNREACH, _errno.EHOSTDOWN,
                                         _errno.ENETDOWN, _errno.EADDRNOTAVAIL):
            return fail("unreachable", "%s: %s" % (where, e.strerror), e.errno)
        return fail("failed", "%s: %s" % (where, e), getattr(e, "errno", None))
