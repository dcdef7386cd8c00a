"""Shared pieces of the tunnel: the egress handshake (both sides) and the byte relay.

Tunnel stream protocol -- one new TCP connection from a worker's proxy to the egress per
client stream, vinehpc wire messages until the handshake is over, raw bytes after it:

    egress -> proxy   hello   {v, nonce: Ne, role: "egress"}
    proxy  -> egress  auth    {v, nonce: Np, dest: {host, port},
                               mac: H(secret, "tunnel-proxy" | Ne | Np|host|port)}
    egress -> proxy   welcome {mac: H(secret, "tunnel-egress" | Np | Ne), ok: true}
                   or welcome {mac, ok: false, error: denied|dns|refused|unreachable|timeout|failed,
                               detail, errno?}
    then (ok only): raw bidirectional relay proxy <-> destination.

The roles differ from the worker/manager handshake's ("worker"/"manager"), so a MAC from one
protocol is never accepted by the other; the proxy's MAC covers the destination, so it
cannot be replayed for another one.  A wrong secret: the egress closes the connection.
"""
from __future__ import annotations

import errno as _errno
import os
import socket
import threading

from vinehpc.protocol import auth, wire

HANDSHAKE_TIMEOUT = 10.0       # the egress waits this long for the proxy's auth
CONNECT_TIMEOUT = 10.0         # the egress's connect() to the destination
BUF = 1 << 20                  # relay chunk / pipe size
ROLE_PROXY = "tunnel-proxy"
ROLE_EGRESS = "tunnel-egress"
ERRORS = ("denied", "dns", "refused", "unreachable", "timeout", "failed")

_HAVE_SPLICE = hasattr(os, "splice") and hasattr(socket, "SHUT_WR")


class StreamError(Exception):
    """A stream could not be opened. kind is one of ERRORS (or "failed" for anything else)."""

    def __init__(self, kind: str, detail: str = "", errno: int | None = None):
        super().__init__("%s: %s" % (kind, detail) if detail else kind)
        self.kind = kind if kind in ERRORS else "failed"
        self.detail = detail
        self.errno = errno


def proxy_mac(secret: str, nonce_e: str, nonce_p: str, host: str, port: int) -> str:
    return auth.mac(secret, ROLE_PROXY, nonce_e, "%s|%s|%d" % (nonce_p, host, port))


def check_proxy_mac(secret, nonce_e, nonce_p, host, port, got) -> bool:
    return auth.check(secret, ROLE_PROXY, nonce_e, "%s|%s|%d" % (nonce_p, host, port), got)


def tune(sock: socket.socket) -> None:
    """Low latency and liveness for a relayed TCP socket."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    except OSError:
        pass


def read_message(sock: socket.socket, dec: wire.Decoder):
    """One message from a pre-auth socket (the socket's timeout applies). None on EOF."""
    while True:
        msgs = dec.feed(b"")
        if msgs:
            return msgs[0]
        b = sock.recv(65536)
        if not b:
            return None
        dec.buf += b


def parse_hostport(s: str, default_port: int | None = None) -> tuple:
    """"host:port", "[v6]:port" (or just a host when default_port is given) -> (host, port)."""
    s = s.strip()
    if s.startswith("["):
        host, _, rest = s[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
    elif s.count(":") == 1:
        host, port = s.split(":")
    else:
        host, port = s, None
    if port in (None, ""):
        if default_port is None:
            raise ValueError("%r: expected HOST:PORT" % s)
        return host, default_port
    p = int(port)
    if not 0 <= p <= 65535:
        raise ValueError("%r: port out of range" % s)
    return host, p


def open_stream(egress: tuple, secret: str, host: str, port: int, *,
                connect_timeout: float = CONNECT_TIMEOUT, handshake_timeout: float | None = None):
    """Proxy side: open a stream to host:port through the egress.

    Returns (socket, leftover bytes already received from the destination).
    Raises StreamError (kind = the egress's error, or "failed" when the egress itself cannot
    be reached, closes the connection (wrong secret) or does not prove it knows the secret)."""
    if handshake_timeout is None:
        handshake_timeout = connect_timeout + HANDSHAKE_TIMEOUT
    try:
        s = socket.create_connection(egress, timeout=connect_timeout)
    except OSError as e:
        raise StreamError("failed", "cannot reach the egress at %s:%d: %s" % (egress[0], egress[1], e))
    try:
        tune(s)
        s.settimeout(handshake_timeout)
        dec = wire.Decoder(max_ctl=wire.PREAUTH_MAX_CTL, allow_frames=False)
        try:
            hello = read_message(s, dec)
            if hello is None or hello[0] != "hello" or not isinstance(hello[1].get("nonce"), str):
                raise StreamError("failed", "the egress at %s:%d sent no hello" % egress)
            ne = hello[1]["nonce"]
            np_ = auth.nonce()
            s.sendall(wire.encode_bytes("auth", {"v": wire.VERSION, "nonce": np_,
                                                 "mac": proxy_mac(secret, ne, np_, host, port),
                                                 "dest": {"host": host, "port": port}}))
            w = read_message(s, dec)
        except (OSError, wire.ProtocolError) as e:
            raise StreamError("failed", "handshake with the egress at %s:%d: %s" % (egress[0], egress[1], e))
        if w is None:
            raise StreamError("failed", "the egress at %s:%d closed the connection during the handshake "
                                        "(wrong secret?)" % egress)
        name, ctl, _ = w
        if name != "welcome" or not auth.check(secret, ROLE_EGRESS, np_, ne, ctl.get("mac")):
            raise StreamError("failed", "the egress at %s:%d did not prove it knows the secret" % egress)
        if not ctl.get("ok"):
            e = ctl.get("errno")
            raise StreamError(str(ctl.get("error")), str(ctl.get("detail", ""))[:500],
                              e if isinstance(e, int) else None)
        s.settimeout(None)
        return s, bytes(dec.buf)
    except BaseException:
        s.close()
        raise


# ------------------------------------------------------------------------------- relay
def _pump_splice(src, dst, counter, idx) -> None:
    """src -> dst through a kernel pipe (no copy through Python)."""
    r, w = os.pipe()
    try:
        try:
            import fcntl
            fcntl.fcntl(w, getattr(fcntl, "F_SETPIPE_SZ", 1031), BUF)
        except OSError:
            pass
        sfd, dfd = src.fileno(), dst.fileno()
        while True:
            n = os.splice(sfd, w, BUF, flags=getattr(os, "SPLICE_F_MOVE", 1))
            if n == 0:
                return
            counter[idx] += n
            while n:
                n -= os.splice(r, dfd, n, flags=getattr(os, "SPLICE_F_MOVE", 1))
    finally:
        os.close(r)
        os.close(w)


def _pump_copy(src, dst, counter, idx) -> None:
    buf = bytearray(256 << 10)
    view = memoryview(buf)
    while True:
        n = src.recv_into(buf)
        if n == 0:
            return
        dst.sendall(view[:n])
        counter[idx] += n


def _pump(src, dst, first: bytes, counter: list, idx: int, on_error) -> None:
    try:
        if first:
            dst.sendall(first)
            counter[idx] += len(first)
        if _HAVE_SPLICE:
            try:
                _pump_splice(src, dst, counter, idx)
            except OSError as e:
                if e.errno in (_errno.EINVAL, _errno.ENOSYS) and counter[idx] == len(first):
                    _pump_copy(src, dst, counter, idx)    # no splice for these fds: copy
                else:
                    raise
        else:
            _pump_copy(src, dst, counter, idx)
        try:
            dst.shutdown(socket.SHUT_WR)       # half-close: pass the EOF on, keep the other way open
        except OSError:
            pass
    except OSError:
        on_error()


def relay(a: socket.socket, b: socket.socket, a_to_b_first: bytes = b"", b_to_a_first: bytes = b"") -> tuple:
    """Relay until both directions have ended; always closes both sockets.

    Returns (bytes a->b, bytes b->a). Runs one direction on a helper thread and the other on
    the calling thread. A reset on either side tears both down."""
    for s in (a, b):
        s.settimeout(None)
        tune(s)
    counter = [0, 0]

    def abort():
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    t = threading.Thread(target=_pump, args=(b, a, b_to_a_first, counter, 1, abort), daemon=True,
                         name="relay-back")
    try:
        t.start()
        _pump(a, b, a_to_b_first, counter, 0, abort)
        t.join()
    finally:
        a.close()
        b.close()
    return counter[0], counter[1]
