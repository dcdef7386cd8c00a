"""Worker-to-worker file transfers: a worker serves its cache to the run's other workers, and
fetches from them when the manager says so (`fetch`).

Every socket of this path is made here (`listen`, `connect`), so wrapping them (TLS) later is
one change.  A connection opens with the run's handshake in the PEER roles (handshake.py: the
serving worker greets, the fetcher answers; a MAC made for the manager-worker session is never
accepted here), with the handshake's pre-authentication limits: nothing is decoded beyond a tiny
JSON control part before the peer has proven it knows the secret, and nothing on this path is
ever unpickled (file bytes only).  Then the fetcher sends `want {cn}`; the source answers with
`file` chunks (sendfile, from the page cache) or `error`.

Blocking sockets on small threads: the server accepts on its own thread and serves each
connection on one more (the manager bounds how many transfers one source serves at once); a
fetch runs on one of the worker's helper threads.  The worker's event loop never waits on a peer.

A copy still arriving (a fetch from a peer, a put from the manager) is served as it grows, so a
file flows down a chain of workers at the rate of their links: its writer tells an `Arrival`
each piece it wrote and the threads serving it wake on that (no polling), and each hop passes a
piece on as soon as it is written (the fetcher writes a payload as it comes off the socket, not
whole messages).  Every fetcher checks the digest of its own copy before it is used: a corrupt
byte forwarded down a chain fails every copy it reached.
"""
from __future__ import annotations

import hashlib
import logging
import os
import socket
import stat
import threading
import time

from ..protocol import ProtocolError, handshake, messages, wire
from ..protocol.names import check_cachename

log = logging.getLogger("vinehpc.worker")

HANDSHAKE_TIMEOUT = 10.0    # a peer that has not proven itself by then is dropped
STALL = 15.0                # seconds without a byte: the transfer has stalled (its source is hung or gone)
PIECE = 128 << 10           # bytes a fetcher gathers before it writes them (and its own peers may have them):
                            # each hop of a chain holds a file back by about this much (5 ms at 25 MB/s)
PUT_PIECE = 512 << 10       # frames of a put the manager counts as a transfer: the worker passes it on to its
                            # peers as it arrives, a frame at a time (20 ms at 25 MB/s, where 4 MiB took 160)
ORDERED_WAIT = 3.0          # seconds a request for a file we do not hold (yet) waits for its fetch to begin
MAX_CONNECTIONS = 64        # served at once; the manager's per-source limit keeps real use far below
DIGESTS = {"sha256": lambda: hashlib.sha256(), "blake2b16": lambda: hashlib.blake2b(digest_size=16)}


class TransferError(Exception):
    """A fetch did not bring a good copy (the source refused, died, stalled, sent other bytes);
    `local`: the fetching worker could not write it (its disk), whatever the source."""

    def __init__(self, why, local=False):
        super().__init__(why)
        self.local = local


# ---------------------------------------------------------------- sockets (the one place)
def listen(host: str = "") -> socket.socket:
    """The worker's transfer socket, on an ephemeral port of every interface."""
    return socket.create_server((host, 0), backlog=64)


def connect(host: str, port: int, timeout: float) -> socket.socket:
    return socket.create_connection((host, port), timeout=timeout)


# ---------------------------------------------------------------- the handshake, blocking
def drive(sock, side, closed=ConnectionError, why="the peer closed the connection during the handshake"):
    """Feed the sans-I/O handshake `side` from a blocking socket until it returns a message
    (peers here; the worker's side of its manager's handshake too)."""
    data = b""
    while True:
        m = side.receive_data(data)
        if m is not None:
            return m
        data = sock.recv(65536)
        if not data:
            raise closed(why)


def _greet(sock, secret) -> bytes:
    """The source's side: hello, the fetcher's proof, our proof. Returns the bytes read past it."""
    g = handshake.Greeter(secret, handshake.PEER)
    sock.sendall(g.hello())
    drive(sock, g)
    sock.sendall(g.welcome())
    return g.rest


def _answer(sock, secret) -> bytes:
    a = handshake.Answerer(secret, handshake.PEER)
    drive(sock, a)
    sock.sendall(a.auth())
    drive(sock, a)
    return a.rest


def _next(sock, dec, want):
    """The next message from a blocking socket, decoded and validated (ProtocolError otherwise)."""
    while True:
        m = dec.next_message()
        if m is not None:
            msg = messages.decode(*m)
            if type(msg) not in want:
                raise ProtocolError("unexpected %s message from a peer" % msg.NAME)
            return msg
        data = sock.recv(1 << 20)
        if not data:
            raise ConnectionError("the peer closed the connection")
        dec.push(data)


# ---------------------------------------------------------------- files arriving
class Arrival:
    """A plain file being written here that peers may already be served: its writer (a fetch, or
    the worker's loop storing a put) says what it wrote, and serving threads wait on that."""
    __slots__ = ("path", "size", "written", "failed", "cond")

    def __init__(self, path, size):
        self.path, self.size = path, size
        self.written = 0
        self.failed = False
        self.cond = threading.Condition()

    def wrote(self, k):
        with self.cond:
            self.written += k
            self.cond.notify_all()

    def fail(self):
        with self.cond:
            self.failed = True
            self.cond.notify_all()

    def move(self, dst, install):
        """The copy is complete (and checked): `install()` puts it at dst, under the lock, so a
        serving thread never opens a name that was just renamed."""
        with self.cond:
            install()
            self.path = dst

    def open(self):
        with self.cond:
            return open(self.path, "rb")

    def beyond(self, off, timeout):
        """Bytes written once more than `off` exist; OSError when the writer failed or wrote
        nothing for `timeout` s (its source stalled: the fetch gives up too)."""
        with self.cond:
            if not self.cond.wait_for(lambda: self.failed or self.written > off, timeout):
                raise OSError("the copy it was receiving stalled")
            if self.failed:
                raise OSError("the copy it was receiving failed")
            return self.written


class Arrivals:
    """cachename -> Arrival of the files arriving here.  An entry stays until the worker's loop
    holds the complete file (`settle`, after its inventory has it): a peer asking in between
    never finds neither.  `cond` is notified at each begin and settle: a request for a file not
    here yet waits on it for its copy to begin (the manager may have told us to fetch it at the
    same moment it told a peer to fetch it from us)."""

    def __init__(self):
        self.cond = threading.Condition()
        self.files = {}

    def begin(self, n, path, size) -> Arrival:
        a = Arrival(path, size)
        with self.cond:
            self.files[n] = a
            self.cond.notify_all()
        return a

    def get(self, n):
        return self.files.get(n)

    def settle(self, n):
        with self.cond:
            a = self.files.pop(n, None)
            self.cond.notify_all()
        return a


# ---------------------------------------------------------------- serving
class FileServer:
    """Serves cache entries to authenticated peers.  `resolve(cachename)` -> the path of a plain
    file this worker holds, or None (not held, a name that could leave the cache); `arrivals`:
    the files on their way here, served as they grow; `notice(text)` is told of each peer refused
    (called on a server thread)."""

    def __init__(self, secret: str, resolve, notice, arrivals: Arrivals, host: str = ""):
        self.secret = secret
        self.resolve = resolve
        self.notice = notice
        self.arrivals = arrivals
        self.sock = listen(host)
        self.port = self.sock.getsockname()[1]
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.served = 0                 # files sent whole (for tests and the worker's log)
        self.closed = False
        self.thread = threading.Thread(target=self._accept, name="vinehpc-peer-server", daemon=True)
        self.thread.start()

    def close(self):
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def _accept(self):
        while not self.closed:
            try:
                sock, addr = self.sock.accept()
            except OSError:
                if self.closed:
                    return
                time.sleep(0.1)         # out of descriptors: never spin
                continue
            if not self.slots.acquire(blocking=False):
                sock.close()
                self.notice("refused a transfer connection from %s: %d already served" % (addr[0], MAX_CONNECTIONS))
                continue
            threading.Thread(target=self._serve, args=(sock, addr), name="vinehpc-peer-send", daemon=True).start()

    def _serve(self, sock, addr):
        peer = "%s:%s" % (addr[0], addr[1])
        try:
            with sock:
                sock.settimeout(HANDSHAKE_TIMEOUT)
                try:
                    rest = _greet(sock, self.secret)
                except (OSError, ProtocolError) as e:   # AuthFailed is a ProtocolError
                    self.notice("refused a transfer connection from %s: %s" % (peer, e))
                    return
                sock.settimeout(STALL)
                dec = messages.decoder(max_ctl=wire.PREAUTH_MAX_CTL, allow_frames=False)
                dec.push(rest)
                try:
                    want = _next(sock, dec, (messages.Want,))
                except (OSError, ProtocolError) as e:
                    self.notice("dropped transfer peer %s: %s" % (peer, e))
                    return
                self._send(sock, want.cn, peer)
        finally:
            self.slots.release()

    def _send(self, sock, n, peer):
        try:
            fh, size, arrival = self._open(check_cachename(n))
        except (OSError, ValueError) as e:
            sock.sendall(messages.encode_bytes(messages.Error(cn=n[:200], reason="cannot send %s: %s" % (n[:200], e))))
            return
        try:
            with fh:
                _stream(sock, fh, n, size, arrival)
            self.served += 1
        except OSError as e:        # the fetcher went away or stalled: its worker reports it to the manager
            log.info("transfer of %s to %s ended early: %s", n, peer, e)

    def _open(self, n):
        """(open file, its size, its Arrival or None) of entry n: a complete one, or one still
        arriving (a copy on its way is already a source)."""
        deadline = time.monotonic() + ORDERED_WAIT
        with self.arrivals.cond:    # (the lock under which begin and settle notify: no wake-up missed)
            while True:
                path = self.resolve(n)
                arrival = None if path is not None else self.arrivals.files.get(n)
                if path is not None or arrival is not None:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise OSError("not held here")
                self.arrivals.cond.wait(left)   # woken when a copy begins or completes here
        fh = open(path, "rb") if arrival is None else arrival.open()
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            fh.close()
            raise OSError("not a plain file")
        return fh, st.st_size if arrival is None else arrival.size, arrival


def _stream(sock, fh, n, size, arrival=None):
    """`file` messages of the `size` bytes of fh (sendfile: through the kernel, no copy here).  A
    file still arriving is sent as its `arrival` says bytes were written, and given up if its
    writer fails or stops (no growth for STALL s)."""
    code = messages.CODES["file"]
    off = 0
    while True:
        have = arrival.beyond(off, STALL) if arrival is not None and off < size else size
        k = min(have, size) - off
        k = min(k, wire.CHUNK)
        last = off + k >= size
        sock.sendall(wire.encode_head(code, {"cn": n, "off": off, "last": last, "size": size}, [k]))
        if k and sock.sendfile(fh, off, k) != k:
            raise OSError("%s is shorter than its writer said" % n)    # (the message announced k bytes)
        off += k
        if last:
            return


# ---------------------------------------------------------------- fetching
def fetch(host: str, port: int, secret: str, n: str, part: str, size: int, digest: str | None,
          stall: float = STALL, arrivals: Arrivals | None = None) -> int:
    """Get cache entry `n` from the worker at host:port into the file `part` (created; removed
    on failure), checking its size and digest; with `arrivals`, the copy is registered there as it
    is written (this worker's peers may be served from it meanwhile; the caller moves it into
    place and settles it).  Returns the bytes received; raises TransferError."""
    check_cachename(n)
    check = _digest_check(digest)
    try:
        sock = connect(host, port, timeout=min(stall, HANDSHAKE_TIMEOUT))
    except OSError as e:
        raise TransferError("cannot connect to %s:%d: %s" % (host, port, e)) from None
    try:
        out = open(part, "wb", buffering=0)     # what `arrival` is told was written is in the file
    except OSError as e:
        sock.close()
        raise TransferError("cannot write %s: %s" % (part, e), local=True) from None
    sink = _Sink(sock, out, part, size, check, arrivals.begin(n, part, size) if arrivals is not None else None)
    try:
        with sock, out:
            sock.settimeout(min(stall, HANDSHAKE_TIMEOUT))
            rest = _answer(sock, secret)
            sock.settimeout(stall)
            sock.sendall(messages.encode_bytes(messages.Want(cn=n)))
            sink.wake_at(size)
            dec = messages.decoder(max_frame=wire.CHUNK)
            dec.push(rest)
            buf = memoryview(bytearray(4 * PIECE))
            while True:
                m, k = _next_file(sock, dec)
                if type(m) is messages.Error:
                    raise TransferError("the source refused: %s" % m.reason)
                got = sink.got
                if m.cn != n or m.off != got or m.size != size or k > size - got or (m.last and got + k != size):
                    raise TransferError("the source sent %s at %d+%d of %d bytes, expected %s at %d of %d"
                                        % (m.cn[:80], m.off, k, m.size, n, got, size))
                _payload(sock, dec, k, buf, sink.keep)
                if m.last:
                    break
        if check is not None and not check[0].hexdigest().startswith(check[1]):
            raise TransferError("corrupt copy: its %s digest is not the expected %s" % (digest.split(":")[0], digest))
        return sink.got
    except BaseException as e:
        _remove(part)
        if sink.arrival is not None:
            sink.arrival.fail()     # before the worker hears of it: nothing serves a copy that failed
        if isinstance(e, socket.timeout):
            raise TransferError("stalled: no byte from %s:%d for %g s" % (host, port, stall)) from None
        if isinstance(e, (OSError, ProtocolError)):
            raise TransferError("from %s:%d: %s" % (host, port, e)) from None
        raise


class _Sink:
    """Where a fetch puts the bytes it receives: the part file, the digest, the Arrival."""
    __slots__ = ("sock", "out", "part", "size", "check", "arrival", "got", "lowat")

    def __init__(self, sock, out, part, size, check, arrival):
        self.sock, self.out, self.part, self.size, self.check, self.arrival = sock, out, part, size, check, arrival
        self.got = 0
        self.lowat = 1

    def keep(self, piece):
        try:
            view = memoryview(piece)
            while view:
                view = view[self.out.write(view):]
        except OSError as e:
            raise TransferError("cannot write %s: %s" % (self.part, e), local=True) from None
        if self.check is not None:
            self.check[0].update(piece)
        if self.arrival is not None:
            self.arrival.wrote(len(piece))
        self.got += len(piece)
        self.wake_at(self.size - self.got)

    def wake_at(self, k):
        """Wake this thread when k bytes (at most PIECE) wait on the socket, not at every packet
        (a fetch at 25 MB/s would wake ~17,000 times a second): the rest of the file is still to
        come, so they will (the source closing the connection wakes it too)."""
        k = max(1, min(k, PIECE))
        if k < self.lowat or self.lowat == 1 < k:
            self.lowat = k
            if hasattr(socket, "SO_RCVLOWAT"):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, k)


def _next_file(sock, dec):
    """The next `file` (its payload's length; the payload still to read) or `error` message."""
    while True:
        h = dec.next_head()
        if h is not None:
            name, ctl, lengths = h
            msg = messages.decode(name, ctl, [None] * len(lengths))    # the payload is read after
            if type(msg) not in (messages.File, messages.Error):
                raise ProtocolError("unexpected %s message from a peer" % msg.NAME)
            return msg, sum(lengths)
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("the peer closed the connection")
        dec.push(data)


def _payload(sock, dec, k, buf, keep):
    """Hand the k bytes of a payload to keep() as they come off the socket (what the decoder
    already holds first), in pieces of PIECE or more -- never waiting for the whole message."""
    held = dec.take(k)
    if held:
        keep(held)
        k -= len(held)
    while k:
        want = min(k, len(buf))
        filled = 0
        while filled < min(want, PIECE):
            r = sock.recv_into(buf[filled:want])
            if not r:
                raise ConnectionError("the peer closed the connection")
            filled += r
        keep(buf[:filled])
        k -= filled


def _digest_check(digest):
    """(hasher, expected hex prefix) for a "NAME:HEX" digest, or None (size is checked alone)."""
    if digest is None:
        return None
    name, _, hexd = digest.partition(":")
    if name not in DIGESTS or len(hexd) < 16:
        raise TransferError("unknown digest %r" % digest)
    return DIGESTS[name](), hexd


def _remove(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
