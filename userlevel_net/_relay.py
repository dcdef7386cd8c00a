"""Shared pieces of the tunnel: the egress handshake's proxy side and the byte relay.

Tunnel stream protocol -- one new TCP connection from a worker's proxy to the egress per
client stream, vinehpc wire messages until the handshake is over, raw bytes after it (the
handshake is vinehpc.protocol.handshake's, with its TUNNEL roles):

    egress -> proxy   hello   {v, nonce: Ne, role: "egress"}
    proxy  -> egress  auth    {v, nonce: Np, dest: {host, port},
                               mac: H(secret, "tunnel-proxy" | Ne | Np|host|port)}
    egress -> proxy   welcome {mac: H(secret, "tunnel-egress" | Np | Ne), ok: true}
                   or welcome {mac, ok: false, error: denied|dns|refused|unreachable|timeout|failed,
                               detail, errno?}
    then (ok only): raw bidirectional relay proxy <-> destination.  The proxy may send bytes for
    the destination right behind its auth (a plain HTTP request): the egress passes them on once
    connected, or drops them with the error.

The roles differ from the worker/manager handshake's ("worker"/"manager"), so a MAC from one
protocol is never accepted by the other; the proxy's MAC covers the destination, so it
cannot be replayed for another one.  A wrong secret: the egress closes the connection.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import os
import select
import socket
import threading

from vinehpc.protocol import ProtocolError, handshake

HANDSHAKE_TIMEOUT = 30.0       # the egress waits this long for the proxy's auth (a ready connection waits)
READY_MAX_AGE = 20.0           # the proxy uses a ready connection only this long after its hello
CONNECT_TIMEOUT = 10.0         # the egress's connect() to the destination
BUF = 1 << 20                  # relay chunk / pipe size
BULK_AFTER = 1 << 20           # a stream direction moves to its own splicing thread after this many bytes
COPY_BUF = 64 << 10            # recv/send buffer before that
ERRORS = ("denied", "dns", "refused", "unreachable", "timeout", "failed")

_HAVE_SPLICE = hasattr(os, "splice") and hasattr(socket, "SHUT_WR")


class StreamError(Exception):
    """A stream could not be opened. kind is one of ERRORS (or "failed" for anything else)."""

    def __init__(self, kind: str, detail: str = "", errno: int | None = None):
        super().__init__("%s: %s" % (kind, detail) if detail else kind)
        self.kind = kind if kind in ERRORS else "failed"
        self.detail = detail
        self.errno = errno


def tune(sock: socket.socket) -> None:
    """Low latency and liveness for a relayed TCP socket."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    except OSError:
        pass


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




# ------------------------------------------------------------------------- the event loop
# The proxy and the egress each run ONE thread: an asyncio event loop.  Handshakes are
# coroutines on non-blocking sockets; an open stream is relayed by callbacks on that loop,
# moving bytes with non-blocking splice(2) through a kernel pipe (no copy through Python).
# No thread is started per stream: opening a stream costs a few loop iterations, not thread
# start-ups and GIL hand-offs.  Name resolution (getaddrinfo blocks) runs on the loop's
# default executor, and only for names: address literals are used as they are.
class LoopThread:
    """An asyncio event loop on its own daemon thread."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> "LoopThread":
        self._thread.start()
        return self

    def _run(self):
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            try:
                self.loop.run_until_complete(self.loop.shutdown_default_executor())
            except RuntimeError:
                pass
            self.loop.close()

    def call(self, fn, *args, timeout: float = 10.0):
        """Run fn(*args) on the loop and return its result (from any other thread)."""
        fut = concurrent.futures.Future()

        def run():
            try:
                fut.set_result(fn(*args))
            except BaseException as e:     # handed back to the caller
                fut.set_exception(e)
        self.loop.call_soon_threadsafe(run)
        return fut.result(timeout)

    def shut(self, fn) -> None:
        """Run fn (the owner's teardown) on the loop, then stop the loop."""
        try:
            self.call(fn)
        except (RuntimeError, TimeoutError):    # the loop is gone or stuck: stop it all the same
            pass
        self.stop()

    def stop(self, timeout: float = 5.0) -> None:
        if self.loop.is_closed():
            return
        try:
            self.loop.call_soon_threadsafe(self.loop.stop)
        except RuntimeError:               # already closed
            return
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)


class Deadline:
    """One timer per coroutine: set(s, what) (re)arms it; when it fires the task is cancelled
    and .fired says which step ran out of time."""

    __slots__ = ("loop", "task", "handle", "what", "fired")

    def __init__(self, loop):
        self.loop = loop
        self.task = asyncio.current_task()
        self.handle = None
        self.what = self.fired = None

    def set(self, seconds: float, what: str) -> None:
        self.clear()
        self.fired = None
        self.what = what
        self.handle = self.loop.call_later(seconds, self._fire)

    def _fire(self):
        self.fired = self.what
        self.task.cancel()

    def clear(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


class Reader:
    """Buffered reads from a non-blocking socket, for request parsing; replies can be queued
    with put() and go out in one send when we next wait for the peer (a client that sends its
    whole request at once gets one answer, and is woken once)."""

    __slots__ = ("loop", "sock", "buf", "out")

    def __init__(self, loop, sock):
        self.loop, self.sock, self.buf, self.out = loop, sock, bytearray(), bytearray()

    def put(self, data: bytes) -> None:
        self.out += data

    async def send(self, data: bytes = b"") -> None:
        self.out += data
        if self.out:
            out, self.out = bytes(self.out), bytearray()
            await self.loop.sock_sendall(self.sock, out)

    async def fill(self) -> None:
        if self.out:
            await self.send()
        b = await self.loop.sock_recv(self.sock, 65536)
        if not b:
            raise ConnectionError("the peer closed the connection")
        self.buf += b

    async def exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            await self.fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def until(self, sep: bytes, limit: int):
        """Bytes up to and including sep; None when more than limit bytes came without it."""
        while True:
            i = self.buf.find(sep)
            if i >= 0:
                out = bytes(self.buf[:i + len(sep)])
                del self.buf[:i + len(sep)]
                return out
            if len(self.buf) > limit:
                return None
            await self.fill()

    async def handshake(self, hs):
        """Feed the handshake (vinehpc.protocol.handshake) until it returns a message; None on EOF."""
        data, self.buf = bytes(self.buf), bytearray()
        while True:
            m = hs.receive_data(data)
            if m is not None:
                return m
            data = await self.loop.sock_recv(self.sock, 65536)
            if not data:
                return None


async def connect(loop, sock, addr) -> None:
    """Non-blocking connect; a connection that is already complete when connect() returns
    (loopback, a fast LAN) costs no loop iteration."""
    try:
        sock.connect(addr)
        return
    except BlockingIOError:
        pass
    po = select.poll()                        # (not select(): descriptors >= 1024 are common here)
    po.register(sock, select.POLLOUT)
    if po.poll(0):
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
        return
    await loop.sock_connect(sock, addr)       # (connect() again: EALREADY, then it waits)


def listener(host: str, port: int, defer_accept: bool = False) -> socket.socket:
    """A non-blocking listening socket on host:port (defer_accept: wake us only once the
    client has sent something -- for protocols where the client speaks first)."""
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(1024)
        s.setblocking(False)
        if defer_accept:
            try:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 5)
            except (AttributeError, OSError):
                pass
    except BaseException:
        s.close()
        raise
    return s


def new_socket(family: int) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setblocking(False)
    tune(s)
    return s


class EgressConn:
    """A connection to the egress that has received its hello (the egress's nonce), ready to
    ask for one stream.  The proxy keeps a few of these ready (see proxy.py) so that opening
    a stream costs one round trip to the egress, not three."""

    __slots__ = ("sock", "where", "reader", "hs", "since")

    def __init__(self, sock, where, reader, hs, since):
        self.sock, self.where, self.reader, self.hs, self.since = sock, where, reader, hs, since


async def egress_connect(loop, secret: str, egress_addrs: list, deadline: Deadline, *,
                         connect_timeout: float = CONNECT_TIMEOUT) -> EgressConn:
    """Connect to the egress (addrs: getaddrinfo tuples) and read its hello.  Raises StreamError."""
    s, err = None, None
    try:
        for fam, _, _, _, addr in egress_addrs:      # each address gets its own connect timeout
            deadline.set(connect_timeout, "connect to the egress")
            try:
                s = new_socket(fam)
                await connect(loop, s, addr)
                break
            except asyncio.CancelledError:
                if s is not None:
                    s.close()
                s = None
                if not deadline.fired:
                    raise
                err = "cannot reach the egress at %s: timed out after %.0f s" % (_fmt(addr), connect_timeout)
            except BaseException as e:
                if s is not None:
                    s.close()
                s = None
                if not isinstance(e, OSError):
                    raise
                err = "cannot reach the egress at %s: %s" % (_fmt(addr), e)
        if s is None:
            raise StreamError("failed", err or "no address for the egress")
        deadline.set(connect_timeout, "hello from the egress")
        where = _fmt(addr)
        r = Reader(loop, s)
        hs = handshake.Answerer(secret, handshake.TUNNEL)
        try:
            hello = await r.handshake(hs)
        except (OSError, ProtocolError) as e:
            s.close()
            raise StreamError("failed", "handshake with the egress at %s: %s" % (where, e))
        except asyncio.CancelledError:
            s.close()
            if deadline.fired:
                raise StreamError("timeout", "the egress at %s sent no hello within %.0f s"
                                  % (where, connect_timeout)) from None
            raise
        if hello is None:
            s.close()
            raise StreamError("failed", "the egress at %s sent no hello" % where)
        return EgressConn(s, where, r, hs, loop.time())
    finally:
        deadline.clear()


class StaleConn(Exception):
    """The egress closed the connection before answering: a ready connection that died while it
    waited (try a fresh one), or, on a fresh connection, a wrong secret."""


def alive(sock) -> bool:
    """Is this idle connection still open (no EOF, no reset, nothing unexpected to read)?"""
    try:
        sock.recv(1, socket.MSG_PEEK)       # b"": EOF; bytes: the egress said something unasked
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False


async def egress_request(loop, ec: EgressConn, host: str, port: int, deadline: Deadline,
                         timeout: float = CONNECT_TIMEOUT + HANDSHAKE_TIMEOUT, early: bytes = b""):
    """Ask for a stream to host:port on a connection from egress_connect().  `early`: bytes for
    the destination sent right behind the request (the egress passes them on once connected,
    and drops them if the stream cannot be opened) -- a plain HTTP request saves a round trip.

    Returns (socket, leftover bytes already received from the destination); raises StreamError
    (kind = the egress's error, or "failed" when the egress closes the connection -- wrong
    secret -- or does not prove it knows the secret), or StaleConn."""
    s, where = ec.sock, ec.where
    deadline.set(timeout, "stream request to the egress")
    try:
        try:
            await loop.sock_sendall(s, ec.hs.auth(dest={"host": host, "port": port}) + early)
        except OSError:
            raise StaleConn() from None
        except asyncio.CancelledError:
            if deadline.fired:
                raise StreamError("timeout", "the egress at %s took no request within %.0f s"
                                  % (where, timeout)) from None
            raise
        try:
            w = await ec.reader.handshake(ec.hs)
        except ConnectionResetError:
            raise StaleConn() from None
        except handshake.AuthFailed:
            raise StreamError("failed", "the egress at %s did not prove it knows the secret" % where) from None
        except (OSError, ProtocolError) as e:
            raise StreamError("failed", "handshake with the egress at %s: %s" % (where, e))
        except asyncio.CancelledError:
            if deadline.fired:
                raise StreamError("timeout", "the egress at %s did not answer within %.0f s"
                                  % (where, timeout)) from None
            raise
        if w is None:       # closed: a ready one may have died while it waited (the egress restarted);
            raise StaleConn()   # the caller retries on a fresh connection, where this means a wrong secret
        if not w.ok:
            raise StreamError(str(w.error), (w.detail or "")[:500], w.errno)
        return s, ec.hs.rest
    except BaseException:
        s.close()
        raise
    finally:
        deadline.clear()


def _fmt(addr) -> str:
    return ("[%s]:%d" if ":" in addr[0] else "%s:%d") % (addr[0], addr[1])


def literal_addrinfo(host: str, port: int):
    """getaddrinfo for an address literal, without a resolver round trip; None for a name."""
    for fam in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(fam, host)
        except (OSError, ValueError):
            continue
        addr = (host, port) if fam == socket.AF_INET else (host, port, 0, 0)
        return [(fam, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", addr)]
    return None


# ------------------------------------------------------------------------------- relay
_SPLICE_MOVE = getattr(os, "SPLICE_F_MOVE", 1)


class _Direction:
    """src -> dst.  Bytes given first go out first; then recv/send through a small buffer on
    the event loop.  Once a direction has moved BULK_AFTER bytes it is a bulk transfer: it
    moves to a thread of its own, which splices through a kernel pipe (no copy through
    Python, no loop wake-up per chunk).  Short streams never pay for a thread or a pipe;
    long ones pay for one thread start, once."""

    __slots__ = ("relay", "src", "dst", "sfd", "dfd", "head", "buf", "n", "reading", "writing", "done",
                 "thread", "discard")

    def __init__(self, relay, src, dst, first: bytes, discard: bool = False):
        self.discard = discard    # read and drop what src sends after `first` (see Relay)
        self.relay, self.src, self.dst = relay, src, dst
        self.sfd, self.dfd = src.fileno(), dst.fileno()
        self.head = memoryview(bytes(first)) if first else None   # bytes to send before reading more
        self.buf = None
        self.n = len(first)       # bytes moved
        self.reading = self.writing = self.done = False
        self.thread = None

    def start(self):
        if self.head is not None:
            self._send_head()
        else:
            self._want_read()

    def _want_read(self):
        if self.writing:
            self.relay.loop.remove_writer(self.dfd)
            self.writing = False
        if not self.reading:
            self.relay.loop.add_reader(self.sfd, self.on_readable)
            self.reading = True

    def _want_write(self):
        if self.reading:
            self.relay.loop.remove_reader(self.sfd)
            self.reading = False
        if not self.writing:
            self.relay.loop.add_writer(self.dfd, self.on_writable)
            self.writing = True

    def on_readable(self):
        if self.discard:
            return self._drop_input()
        if self.n >= BULK_AFTER and _HAVE_SPLICE and self._to_thread():
            return
        if self.buf is None:
            self.buf = bytearray(COPY_BUF)
        try:
            k = self.src.recv_into(self.buf)
        except BlockingIOError:
            return
        except OSError:
            return self.relay.abort()
        if k == 0:
            return self._eof()
        self.n += k
        self.head = memoryview(self.buf)[:k]
        self._send_head()

    def _drop_input(self):
        try:
            k = len(self.src.recv(COPY_BUF))
        except BlockingIOError:
            return
        except OSError:
            return self.relay.abort()
        if k == 0:                      # src is done: nothing to pass on, the other way goes on
            self.stop_watching()
            self.done = True
            self.relay.check_done()

    def on_writable(self):
        self._send_head()

    def _send_head(self):
        try:
            while self.head:
                self.head = self.head[self.dst.send(self.head):]
        except BlockingIOError:
            return self._want_write()
        except OSError:
            return self.relay.abort()
        self.head = None
        self._want_read()

    def _eof(self):
        self.stop_watching()
        try:
            self.dst.shutdown(socket.SHUT_WR)   # half-close: pass the EOF on, keep the other way open
        except OSError:
            pass
        self.done = True
        self.relay.check_done()

    def stop_watching(self):
        loop = self.relay.loop
        if self.reading:
            loop.remove_reader(self.sfd)
            self.reading = False
        if self.writing:
            loop.remove_writer(self.dfd)
            self.writing = False

    # bulk: a thread of its own ------------------------------------------------------------
    def _to_thread(self) -> bool:
        try:
            r, w = os.pipe2(os.O_CLOEXEC)
        except OSError:
            return False
        try:
            import fcntl
            fcntl.fcntl(w, getattr(fcntl, "F_SETPIPE_SZ", 1031), BUF)
        except OSError:
            pass
        self.stop_watching()
        self.buf = None
        self.thread = threading.Thread(target=self._pump, args=(r, w), name="relay-bulk", daemon=True)
        try:
            self.thread.start()
        except RuntimeError:                  # cannot start a thread: stay on the loop
            self.thread = None
            os.close(r)
            os.close(w)
            self._want_read()
            return False
        return True

    def _pump(self, r, w):
        """On the bulk thread: splice src -> pipe -> dst until EOF or an error.  The sockets
        stay non-blocking (the other direction is on the loop): wait with poll()."""
        ok = True
        pin, pout = select.poll(), select.poll()
        pin.register(self.sfd, select.POLLIN)
        pout.register(self.dfd, select.POLLOUT)
        try:
            while True:
                try:
                    k = os.splice(self.sfd, w, BUF, flags=_SPLICE_MOVE)
                except BlockingIOError:
                    pin.poll()
                    continue
                if k == 0:
                    break
                self.n += k
                while k:
                    try:
                        k -= os.splice(r, self.dfd, k, flags=_SPLICE_MOVE)
                    except BlockingIOError:
                        pout.poll()
            try:
                self.dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        except OSError:
            ok = False
        finally:
            os.close(r)
            os.close(w)
            try:
                self.relay.loop.call_soon_threadsafe(self._pumped, ok)
            except RuntimeError:              # the loop is closed: the owner has stopped
                pass

    def _pumped(self, ok):
        self.thread = None
        self.done = True
        if not ok or self.relay.aborted:
            self.relay.abort()
        else:
            self.relay.check_done()


class Relay:
    """Relay a <-> b on the running loop until both directions have ended (or one fails);
    then both sockets are closed and on_close(bytes a->b, bytes b->a) is called once.
    A reset on either side tears both down.  Call only on the loop's thread, with sockets
    that are already non-blocking and tune()d."""

    def __init__(self, loop, a, b, a_to_b_first: bytes = b"", b_to_a_first: bytes = b"", on_close=None,
                 discard_a_to_b: bool = False):
        self.loop = loop
        self.a, self.b = a, b
        self.on_close = on_close
        self.closed = self.aborted = False
        self.ab = _Direction(self, a, b, a_to_b_first, discard=discard_a_to_b)
        self.ba = _Direction(self, b, a, b_to_a_first)
        self.ab.start()
        if not self.closed:
            self.ba.start()

    def check_done(self):
        if self.ab.done and self.ba.done:
            self._close()

    def abort(self):
        """Tear both sides down (a reset, an error, or the owner stopping)."""
        if not self.aborted:
            self.aborted = True
            for s in (self.a, self.b):
                try:
                    s.shutdown(socket.SHUT_RDWR)   # also ends a bulk thread's splice/poll
                except OSError:
                    pass
            for d in (self.ab, self.ba):
                if d.thread is None:
                    d.stop_watching()              # (a bulk thread, if any, calls back when it ends)
                    d.done = True
        self._close()

    def stop(self, timeout: float = 2.0):
        """The owner is stopping: abort, wait for bulk threads to notice, close everything now."""
        self.abort()
        for d in (self.ab, self.ba):
            t = d.thread
            if t is not None:
                t.join(timeout)
                if not t.is_alive():
                    d.thread = None
        self._close()

    def _close(self):
        if self.closed or self.ab.thread is not None or self.ba.thread is not None:
            return                    # a bulk thread still uses the sockets: it calls back when done
        self.closed = True
        for d in (self.ab, self.ba):
            d.stop_watching()
        self.a.close()
        self.b.close()
        if self.on_close is not None:
            self.on_close(self.ab.n, self.ba.n)
