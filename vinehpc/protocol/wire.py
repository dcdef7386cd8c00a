"""Wire format: one fixed binary header, a small JSON control part, raw payload frames.

    header   = magic b"VN" | version u8 | code u8 | nframes u16 | ctl_len u32     (10 bytes)
    lengths  = nframes x u64
    control  = ctl_len bytes of UTF-8 JSON (an object)
    frames   = the payloads, back to back (pickles, file bytes: never inside JSON)

Every length is checked against the decoder's limits *before* anything is buffered for it,
so a peer cannot make us allocate more than the limits allow.  Pickles are never touched
here: frames are opaque bytes.
"""
from __future__ import annotations

import json
import struct

MAGIC = b"VN"
VERSION = 1
HEADER = struct.Struct("!2sBBHI")

# message codes (names kept in one table so logs can say what arrived)
CODES = {
    "hello": 1, "auth": 2, "welcome": 3, "info": 4, "error": 5,
    "ping": 10, "pong": 11, "exit": 12,
    "fn": 20, "put": 21, "task": 22, "kill": 23, "get": 24, "unlink": 25,
    "result": 30, "outfile": 31, "file": 32, "cached": 33, "status": 34,
}
NAMES = {v: k for k, v in CODES.items()}

MAX_CTL = 1 << 20            # 1 MiB of JSON control per message
MAX_FRAME = 1 << 30          # 1 GiB per payload frame
MAX_FRAMES = 16
PREAUTH_MAX_CTL = 4096       # before the handshake: tiny JSON, no frames at all
CHUNK = 4 << 20              # file transfers are cut into frames of this size


class ProtocolError(Exception):
    """The peer sent something that is not a valid vinehpc message; close that connection."""


_json = json.JSONEncoder(separators=(",", ":")).encode   # built once: json.dumps(..., separators) builds one per call


def encode(name: str, ctl: dict | None = None, frames=()) -> list:
    """Return the message as a list of buffers (header+lengths+ctl first, then the frames)."""
    body = _json(ctl).encode() if ctl else b"{}"
    n = len(frames)
    head = HEADER.pack(MAGIC, VERSION, CODES[name], n, len(body))
    if n:
        head += struct.pack("!%dQ" % n, *[len(f) for f in frames])
    out = [head + body]
    out.extend(frames)
    return out


def encode_head(name: str, ctl: dict, lengths) -> bytes:
    """Header, frame lengths and control part of a message whose frames are sent separately."""
    body = _json(ctl).encode() if ctl else b"{}"
    head = HEADER.pack(MAGIC, VERSION, CODES[name], len(lengths), len(body))
    if lengths:
        head += struct.pack("!%dQ" % len(lengths), *lengths)
    return head + body


def encode_bytes(name: str, ctl: dict | None = None, frames=()) -> bytes:
    return b"".join(encode(name, ctl, frames))


class Decoder:
    """Incremental decoder: feed() bytes as they arrive, get complete messages back.

    A message is a tuple (name, ctl_dict, [frame bytes...]).  Raises ProtocolError on any
    violation; the caller then closes the connection.
    """

    def __init__(self, max_ctl: int = MAX_CTL, max_frame: int = MAX_FRAME, allow_frames: bool = True):
        self.buf = bytearray()
        self.max_ctl = max_ctl
        self.max_frame = max_frame
        self.allow_frames = allow_frames
        self._need = None   # (name, nframes, ctl_len, frame_lengths, total) of the message being read

    def set_limits(self, *, max_ctl: int, max_frame: int, allow_frames: bool) -> None:
        self.max_ctl, self.max_frame, self.allow_frames = max_ctl, max_frame, allow_frames

    def missing(self) -> int:
        """Bytes still needed to complete the message being read (0 if unknown)."""
        return self._need[4] - len(self.buf) if self._need is not None else 0

    def feed(self, data) -> list:
        self.buf += data
        out = []
        while True:
            msg = self._next()
            if msg is None:
                return out
            out.append(msg)
            # limits may change after a message (handshake): the caller re-feeds nothing,
            # it changes limits between feed() calls; pre-auth peers send one message at a time.
            if msg[0] in ("hello", "auth", "welcome") and len(self.buf):
                # do not decode past the handshake with pre-auth limits
                return out

    def _next(self):
        buf = self.buf
        if self._need is None:
            if len(buf) < HEADER.size:
                return None
            magic, version, code, nframes, ctl_len = HEADER.unpack_from(buf, 0)
            if magic != MAGIC:
                raise ProtocolError("bad magic %r: not a vinehpc peer" % bytes(magic))
            if version != VERSION:
                raise ProtocolError("protocol version %d, expected %d: upgrade vinehpc on both sides" % (version, VERSION))
            name = NAMES.get(code)
            if name is None:
                raise ProtocolError("unknown message code %d" % code)
            if ctl_len > self.max_ctl:
                raise ProtocolError("control part of %d bytes exceeds the limit %d" % (ctl_len, self.max_ctl))
            if nframes and not self.allow_frames:
                raise ProtocolError("payload frames are not allowed before authentication")
            if nframes > MAX_FRAMES:
                raise ProtocolError("%d frames exceed the limit %d" % (nframes, MAX_FRAMES))
            lens_end = HEADER.size + 8 * nframes
            if len(buf) < lens_end:
                return None
            lengths = struct.unpack_from("!%dQ" % nframes, buf, HEADER.size) if nframes else ()
            for n in lengths:
                if n > self.max_frame:
                    raise ProtocolError("frame of %d bytes exceeds the limit %d" % (n, self.max_frame))
            self._need = (name, lens_end, ctl_len, lengths, lens_end + ctl_len + sum(lengths))
        name, start, ctl_len, lengths, total = self._need
        if len(buf) < total:
            return None
        try:
            ctl = json.loads(bytes(buf[start:start + ctl_len])) if ctl_len else {}
        except (ValueError, RecursionError) as e:   # RecursionError: "[[[[..." nested past the limit
            raise ProtocolError("control part is not JSON: %s" % e) from None
        if not isinstance(ctl, dict):
            raise ProtocolError("control part must be a JSON object")
        frames = []
        pos = start + ctl_len
        view = memoryview(buf)
        for n in lengths:
            frames.append(bytes(view[pos:pos + n]))     # one copy (a bytearray slice would make two)
            pos += n
        view.release()
        del buf[:total]
        self._need = None
        return name, ctl, frames
