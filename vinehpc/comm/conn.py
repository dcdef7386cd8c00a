"""A message connection over a non-blocking stream socket, driven by a selectors loop.

Outgoing data is a queue of buffers and *streams* (iterators yielding encoded messages, used
for file transfers): a stream is pulled one chunk at a time, once everything queued before
it is on the wire, so sending a large file holds one chunk in memory, and messages queued
after a stream are delivered after it (TCP keeps the order): a task arrives after its inputs.
"""
from __future__ import annotations

import collections
import os
import socket
import ssl
import threading

from ..protocol import messages, wire

IOV_MAX = 512
SCRATCH = 1 << 20       # reads up to this size go through recv_bytes' reused buffer
TLS_BATCH = 256 << 10   # TLS: small messages are joined up to this size per SSL write
TLS_RECORD = 16 << 10   # TLS: the most one record (one SSL read) carries
_BUFFER = (bytes, bytearray, memoryview)
BATCH_CTL = 256 << 10   # a batch's control part is closed past this size (a message's limit: wire.MAX_CTL)
_BATCHED = frozenset(messages.BATCHED)
_ITEM = {n: b'["%s",0,' % n.encode() for n in messages.BATCHED}     # an item without frames, up to its control part


def unix_address(where: str) -> str:
    """The address to bind or connect a Unix socket to: a path, or for "@NAME" (how vinehpc names
    one in Linux's abstract namespace: in logs, on command lines) NAME after a NUL byte."""
    return "\0" + where[1:] if where.startswith("@") else where


def recv_bytes(sock: socket.socket, size: int) -> bytes:
    """sock.recv(size) (same result, same exceptions, b"" on EOF) without a fresh `size`-byte
    allocation per call.  Why: recv(n) allocates n bytes and shrinks them to what arrived; for
    n >= 128 KiB glibc serves that with mmap, so each read also cost an mmap, page faults, an
    mremap and a munmap, a large share of the worker's CPU per task on short tasks (whether it
    happened depended on the allocator's history).  Reads up to SCRATCH land in one buffer per
    thread, reused, and only what arrived is copied out."""
    if size > SCRATCH:
        return sock.recv(size)      # a large file's chunk: one allocation per megabytes is fine
    view = getattr(_scratch, "view", None)
    if view is None:
        view = _scratch.view = memoryview(bytearray(SCRATCH))
    n = sock.recv_into(view, size)
    return view[:n].tobytes()


_scratch = threading.local()    # per thread: the manager's I/O thread and a worker's loop read at once


class Closed(Exception):
    """The peer closed the connection (or it broke)."""


class Connection:
    """An authenticated connection (handshake.py runs before it, with its own limits).
    `leftover`: bytes the handshake read past its last message.

    `sock` may be a TLS socket (protocol/tls.py) whose handshake is done: then writes go through
    SSL writes (no sendmsg, and no sendfile, which would bypass the encryption) and a read drains
    what the TLS object holds decrypted, which select() cannot see (see _recv_tls, _flush_tls)."""

    def __init__(self, sock: socket.socket, leftover: bytes = b""):
        sock.setblocking(False)
        self.unix = sock.family == socket.AF_UNIX     # a worker on this machine (or a socketpair in tests)
        if not self.unix:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass     # reset already: the first read says so
        self.sock = sock
        self.dec = messages.decoder()
        self.dec.push(leftover)
        self.out = collections.deque()
        self.closed = False
        self.peer = _peer(sock)
        self.tls = isinstance(sock, ssl.SSLSocket)
        self._blob = None       # TLS: the buffer of an SSL write that must be retried as it is

    def fileno(self):
        return self.sock.fileno()

    # ---- sending -------------------------------------------------------------------
    def send_msg(self, msg: messages.Message) -> None:
        self._seal()
        self.out.extend(messages.encode(msg))

    def send(self, name: str, ctl: dict | None = None, frames=()) -> None:
        """Untyped form of send_msg (a control dict): the same bytes -- except that the messages
        sent a task at a time (messages.BATCHED: task, result) queued back to back go as one
        `batch` message (one header, one JSON document for the peer to parse: issue 15's per-task
        cost).  The control part is encoded now (the caller may change its dict afterwards), the
        batch when it is closed: by any other message, or by flush()."""
        out = self.out
        if name in _BATCHED:
            item = (name, task_ctl(ctl) if name == "task" else wire.encode_ctl(ctl), frames)
            if out and type(out[-1]) is _Batch:
                out[-1].append(item)
            else:
                out.append(_Batch((item,)))
            return
        self._seal()
        out.extend(messages.encode_named(name, ctl, frames))

    def send_bytes(self, data: bytes) -> None:
        """Already encoded bytes (the handshake's)."""
        self._seal()
        self.out.append(data)

    def send_stream(self, it) -> None:
        """Queue an iterator of encoded messages (lists of buffers), pulled lazily."""
        self._seal()
        self.out.append(it)

    def _seal(self) -> None:
        """Close the open batch, if any (it is always the last thing queued): its messages become
        encoded buffers, one alone as itself, more as `batch` messages within the limits."""
        out = self.out
        if out and type(out[-1]) is _Batch:
            items = out.pop()
            if len(items) == 1:         # (most often, on a large fleet: a task a turn to each worker)
                _batch_message(out, items, items[0][2])
            else:
                _encode_batch(out, items)

    def transfers(self) -> int:
        """Streams (files being sent) queued."""
        return sum(1 for b in self.out if not isinstance(b, _BUFFER) and type(b) is not _Batch)

    @property
    def buffered(self) -> int:
        """Bytes of encoded messages queued (streams and file ranges not counted)."""
        return sum(len(b) for b in self.out if isinstance(b, (bytes, bytearray, memoryview)))

    def wants_write(self) -> bool:
        return bool(self.out)

    @staticmethod
    def _sent(send, data):
        """send(data) on the socket: the bytes it took, None when it takes nothing now."""
        try:
            return send(data)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as e:
            raise Closed(str(e)) from None

    def flush(self) -> bool:
        """Write what the socket takes now. Returns True when everything queued is sent."""
        self._seal()
        if self.tls:
            return self._flush_tls()
        out = self.out
        if len(out) == 1 and type(out[0]) is bytes:
            # one message queued (most flushes on a large fleet: a worker's refill): a plain send
            head = out[0]
            n = self._sent(self.sock.send, head)
            if n is None:
                return False
            if n == len(head):
                out.clear()
                return True
            out[0] = memoryview(head)[n:]   # the socket is full: the rest when it is writable
            return False
        while out:
            head = out[0]
            if isinstance(head, FileRange):
                # file bytes straight from the page cache to the socket (sendfile: no copy here)
                try:
                    n = os.sendfile(self.sock.fileno(), head.fd, head.offset, head.count)
                except (BlockingIOError, InterruptedError):
                    return False
                except OSError as e:
                    raise Closed(str(e)) from None
                if n == 0:
                    raise Closed("file shrank while being sent")
                head.offset += n
                head.count -= n
                if head.count == 0:
                    out.popleft()
                continue
            if not isinstance(head, _BUFFER):
                self._pull(head)
                continue
            bufs = []
            for b in out:
                if not isinstance(b, (bytes, bytearray, memoryview)) or len(bufs) >= IOV_MAX:
                    break
                bufs.append(b)
            n = self._sent(self.sock.sendmsg, bufs)
            if n is None:
                return False
            while n:
                b = out[0]
                if n >= len(b):
                    n -= len(b)
                    out.popleft()
                else:
                    out[0] = memoryview(b)[n:]
                    n = 0
        return True

    def _pull(self, head) -> None:
        """A stream at the head: everything before it is on the wire, put its next chunk first."""
        try:
            chunk = next(head)
        except StopIteration:
            self.out.popleft()
            return
        for b in reversed(chunk):
            self.out.appendleft(b)

    def _flush_tls(self) -> bool:
        """flush() over TLS.  An SSL write that could not finish (SSLWantWrite) must be retried
        with the same bytes, so the buffer handed to it stays at the head (`_blob`) until it is
        written; small messages are joined first (one SSL record holds many of them)."""
        out = self.out
        while out:
            head = out[0]
            if head is not self._blob:
                if isinstance(head, FileRange):     # read here: the bytes must go through the TLS object
                    try:
                        data = os.pread(head.fd, head.count, head.offset)
                    except OSError as e:
                        raise Closed(str(e)) from None
                    if not data:
                        raise Closed("file shrank while being sent")
                    head.offset += len(data)
                    head.count -= len(data)
                    if head.count == 0:
                        out.popleft()
                    out.appendleft(data)
                    head = data
                elif not isinstance(head, _BUFFER):
                    self._pull(head)
                    continue
                bufs, size = [], 0
                while out and isinstance(out[0], _BUFFER) and size < TLS_BATCH:
                    b = out.popleft()
                    bufs.append(b)
                    size += len(b)
                head = self._blob = bufs[0] if len(bufs) == 1 else b"".join(bufs)
                out.appendleft(head)
            try:
                n = self.sock.send(head)
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError, InterruptedError):
                return False
            except OSError as e:
                raise Closed(str(e)) from None
            out.popleft()
            self._blob = None
            if n < len(head):       # (a partial write, where the TLS object allows them)
                out.appendleft(memoryview(head)[n:])
        return True

    # ---- receiving -----------------------------------------------------------------
    def read(self) -> list:
        """Read what is available; return the complete messages (a batch's, one by one, its items
        not validated: see typed()). Raises Closed on EOF."""
        return _unbatch(self.dec.feed(self.recv()))

    def typed(self, data=None):
        """The messages now complete as (typed message, control dict), each validated as it is
        taken (messages.decoded: a batch whole, before any of its items): what is available to
        read (Closed on EOF, at once), or `data`, bytes read elsewhere (the handshake's leftover).
        What the manager and the worker act on."""
        return messages.decoded(self.dec.feed(self.recv() if data is None else data))

    def feed(self, data: bytes) -> list:
        """Bytes read elsewhere (the handshake's leftover): the messages now complete."""
        return _unbatch(self.dec.feed(data))

    def recv(self) -> bytes:
        """Read what is available (b"" if nothing is). Raises Closed on EOF."""
        # a big frame on its way (a file): take it in large reads; else small ones
        want = min(max(self.dec.missing(), 1 << 18), 8 << 20)
        if self.tls:
            return self._recv_tls(want)
        try:
            data = recv_bytes(self.sock, want)
        except (BlockingIOError, InterruptedError):
            return b""
        except OSError as e:
            raise Closed(str(e)) from None
        if not data:
            raise Closed("connection closed by peer")
        return data

    def _recv_tls(self, want: int) -> bytes:
        """recv() over TLS.  One SSL read returns at most one record (16 KiB): read on while
        records come full (a large transfer) and `want` is not reached, and never leave
        decrypted bytes inside the TLS object (pending()): select() watches the socket, not the
        object, and would not wake us for them.  Bytes still in the socket wake select() again,
        so a short record ends the read without a last try that would only raise SSLWantRead
        (that try cost a small message a fifth of its TLS overhead)."""
        chunks, got = [], 0
        sock = self.sock
        while True:
            try:
                data = recv_bytes(sock, 1 << 16)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError, InterruptedError):
                break
            except OSError as e:      # (ssl.SSLError too: a broken record, a reset)
                if chunks:
                    break             # give what came; the next read says it
                raise Closed(str(e)) from None
            if not data:
                if chunks:
                    break
                raise Closed("connection closed by peer")
            chunks.append(data)
            got += len(data)
            if not sock.pending() and (len(data) < TLS_RECORD or got >= want):
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.sock.close()
            except OSError:
                pass


# A plain task message -- no inputs, outputs, env, watch, time_max, slots, expect -- is
# {id, cmd or fid, inputs: [], outputs: [], res, category[, pipe]}: a queue of alike tasks differ
# only in their id and command (or function).  What follows those two is encoded once per
# (category, res, pipe) and spliced (issue 15: JSON-encoding the whole message was the larger
# part of sending a task).  The order of an object's keys means nothing in JSON.
_PLAIN = {n: frozenset((n, "id", "inputs", "outputs", "res", "category")) for n in ("cmd", "fid")}
_PIPED = {n: k | {"pipe"} for n, k in _PLAIN.items()}
_RES = frozenset(messages.RES)
_tails = {}             # (cmd or fid, category, cores, memory, disk, gpus, piped) -> encoded tail
TAILS = 256             # kept at most (a run has a few categories and sizes; cleared past this)
_str = wire.json_str


def task_ctl(spec: dict) -> bytes:
    """The encoded control part of a `task` message (what wire.encode_ctl gives, keys reordered)."""
    head = "cmd" if "cmd" in spec else "fid"
    n = len(spec)
    keys = (_PLAIN if n == 6 else _PIPED if n == 7 else None)
    if keys is not None and spec.keys() == keys[head] and (n == 6 or spec["pipe"] is True):
        r, tid, cat, h = spec["res"], spec["id"], spec["category"], spec[head]
        if (not spec["inputs"] and not spec["outputs"] and type(tid) is int and type(cat) is str and type(h) is str
                and type(r) is dict and r.keys() == _RES):
            key = (head, cat, r["cores"], r["memory"], r["disk"], r["gpus"], n)
            if type(key[2]) is int and type(key[3]) is int and type(key[4]) is int and type(key[5]) is int:
                tail = _tails.get(key)
                if tail is None:
                    if len(_tails) >= TAILS:
                        _tails.clear()
                    tail = _tails[key] = wire.encode_ctl({k: v for k, v in spec.items()
                                                          if k != "id" and k != head})[1:]
                return b'{"id":%d,"%s":%s,%s' % (tid, head.encode(), _str(h).encode(), tail)
    return wire.encode_ctl(spec)


class _Batch(list):
    """Queued (name, encoded control part, frames) of messages to send as one batch."""
    __slots__ = ()


def _encode_batch(out, items) -> None:
    """Append to `out` the buffers of `items` (a _Batch) as `batch` messages, each closed before
    its control part passes BATCH_CTL, its frames wire.MAX_FRAMES or its items messages.MAX_BATCH
    (a message too large to share one goes alone, as itself)."""
    parts, frames, size = [], [], 0
    for name, body, fr in items:
        if parts and (size + len(body) > BATCH_CTL or len(frames) + len(fr) > wire.MAX_FRAMES
                      or len(parts) >= messages.MAX_BATCH):
            _batch_message(out, parts, frames)
            parts, frames, size = [], [], 0
        parts.append((name, body, fr))
        frames.extend(fr)
        size += len(body) + 16
    _batch_message(out, parts, frames)


def _batch_message(out, parts, frames):
    """Append to `out` the buffers of one message carrying `parts` (a batch unless it is one)."""
    if len(parts) == 1:
        name, ctl, _ = parts[0]
        code = messages.CODES[name]
    else:
        code = messages.CODES["batch"]
        pieces = [b'{"m":[']
        for name, body, fr in parts:
            pieces += (_ITEM[name] if not fr else b'["%s",%d,' % (name.encode(), len(fr)), body, b"],")
        pieces[-1] = b"]]}"     # (the last item's "]," closes the list and the object instead)
        ctl = b"".join(pieces)
    out.append(wire.head_of(code, ctl, [len(f) for f in frames] if frames else ()))
    out.extend(frames)


def _unbatch(msgs) -> list:
    """The messages with each batch opened (its envelope checked: ProtocolError)."""
    for m in msgs:
        if m[0] == "batch":
            break
    else:
        return msgs
    out = []
    for m in msgs:
        if m[0] == "batch":
            out.extend(messages.unbatch(m[1], m[2]))
        else:
            out.append(m)
    return out


class FileRange:
    """`count` bytes of an open file from `offset`, queued as a frame's payload (sendfile)."""
    __slots__ = ("fd", "offset", "count")

    def __init__(self, fd, offset, count):
        self.fd, self.offset, self.count = fd, offset, count


def file_chunks(fh, name: str, ctl: dict, chunk: int = wire.CHUNK):
    """Encoded `name` messages carrying an open file's bytes in `chunk`-sized frames, for
    Connection.send_stream. Each carries ctl plus off/last (and size); the payload goes by
    sendfile where the file allows it. The file is closed at the end."""
    code = messages.CODES[name]
    try:
        fd = fh.fileno()
        size = os.fstat(fd).st_size
        off = 0
        while True:
            n = max(0, min(chunk, size - off))
            last = off + n >= size
            head = wire.encode_head(code, dict(ctl, off=off, last=last, size=size), [n])
            yield [head, FileRange(fd, off, n)] if n else [head]
            off += n
            if last:
                return
    finally:
        fh.close()


def _peer(sock):
    try:
        p = sock.getpeername()
        return "%s:%s" % (p[0], p[1]) if isinstance(p, tuple) else "this machine (Unix socket)"
    except OSError:
        return "?"
