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
PIECE = 256 << 10           # bytes per `file` message: a worker passing a file on waits for whole messages,
                            # so smaller pieces cost each hop of a chain less delay (10 ms at 25 MB/s)
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


# ---------------------------------------------------------------- serving
class FileServer:
    """Serves cache entries to authenticated peers.  `resolve(cachename)` -> the path of a plain
    file this worker holds, or None (not held, a directory, a name that could leave the cache);
    `notice(text)` is told of each peer refused (called on a server thread)."""

    def __init__(self, secret: str, resolve, notice, host: str = ""):
        self.secret = secret
        self.resolve = resolve
        self.notice = notice
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
            fh, size = self._open(check_cachename(n))
        except (OSError, ValueError) as e:
            sock.sendall(messages.encode_bytes(messages.Error(cn=n[:200], reason="cannot send %s: %s" % (n[:200], e))))
            return
        try:
            with fh:
                _stream(sock, fh, n, size)
            self.served += 1
        except OSError as e:        # the fetcher went away or stalled: its worker reports it to the manager
            log.info("transfer of %s to %s ended early: %s", n, peer, e)

    def _open(self, n):
        """(open file, its size) of entry n: a complete one, or one still arriving from a peer (its
        part file, served as it grows: a copy on its way is already a source)."""
        start = time.monotonic()
        while True:
            got = self.resolve(n)
            if got is None:
                # the manager may have told us to fetch it a moment ago (we are a source as soon as
                # our copy begins) and our loop has not read that yet: wait a little before refusing
                if time.monotonic() - start > ORDERED_WAIT:
                    raise OSError("not held here")
                time.sleep(0.01)
                continue
            path, size = got
            try:
                fh = open(path, "rb")
            except FileNotFoundError:
                if size is None or time.monotonic() - start > STALL:
                    raise
                time.sleep(0.01)        # its fetch has not begun writing yet, or just completed
                continue
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                fh.close()
                raise OSError("not a plain file")
            return fh, st.st_size if size is None else size


def _stream(sock, fh, n, size):
    """`file` messages of the `size` bytes of fh (sendfile: through the kernel, no copy here), sent
    as they exist: a file still being written is followed until complete, and given up if its
    writer stops (no growth for STALL s) or fails (the part file is removed: no link left)."""
    code, fd = messages.CODES["file"], fh.fileno()
    off, grew = 0, time.monotonic()
    while True:
        st = os.fstat(fd)
        k = min(min(st.st_size, size) - off, PIECE)
        if k > 0 or off == size:
            last = off + k >= size
            sock.sendall(wire.encode_head(code, {"cn": n, "off": off, "last": last, "size": size}, [k]))
            if k:
                sock.sendfile(fh, off, k)
            off += k
            if last:
                return
            grew = time.monotonic()
            continue
        if st.st_nlink == 0:
            raise OSError("the copy it was receiving failed")
        if time.monotonic() - grew > STALL:
            raise OSError("the copy it was receiving stalled")
        time.sleep(0.005)


# ---------------------------------------------------------------- fetching
def fetch(host: str, port: int, secret: str, n: str, part: str, size: int, digest: str | None,
          stall: float = STALL) -> int:
    """Get cache entry `n` from the worker at host:port into the file `part` (created; removed
    on failure), checking its size and digest.  Returns the bytes received; raises TransferError."""
    check_cachename(n)
    check = _digest_check(digest)
    try:
        sock = connect(host, port, timeout=min(stall, HANDSHAKE_TIMEOUT))
    except OSError as e:
        raise TransferError("cannot connect to %s:%d: %s" % (host, port, e)) from None
    got = 0
    try:
        out = open(part, "wb")
    except OSError as e:
        sock.close()
        raise TransferError("cannot write %s: %s" % (part, e), local=True) from None
    try:
        with sock, out:
            sock.settimeout(min(stall, HANDSHAKE_TIMEOUT))
            rest = _answer(sock, secret)
            sock.settimeout(stall)
            sock.sendall(messages.encode_bytes(messages.Want(cn=n)))
            dec = messages.decoder(max_frame=wire.CHUNK)
            dec.push(rest)
            while True:
                m = _next(sock, dec, (messages.File, messages.Error))
                if type(m) is messages.Error:
                    raise TransferError("the source refused: %s" % m.reason)
                if m.cn != n or m.off != got or m.size != size:
                    raise TransferError("the source sent %s at %d of %d bytes, expected %s at %d of %d"
                                        % (m.cn[:80], m.off, m.size, n, got, size))
                try:
                    out.write(m.data)
                except OSError as e:
                    raise TransferError("cannot write %s: %s" % (part, e), local=True) from None
                if check is not None:
                    check[0].update(m.data)
                got += len(m.data)
                if m.last:
                    break
        if got != size:
            raise TransferError("got %d bytes, expected %d" % (got, size))
        if check is not None and not check[0].hexdigest().startswith(check[1]):
            raise TransferError("corrupt copy: its %s digest is not the expected %s" % (digest.split(":")[0], digest))
        return got
    except socket.timeout:
        _remove(part)
        raise TransferError("stalled: no byte from %s:%d for %g s" % (host, port, stall)) from None
    except (OSError, ProtocolError) as e:
        _remove(part)
        raise TransferError("from %s:%d: %s" % (host, port, e)) from None
    except TransferError:
        _remove(part)
        raise


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
