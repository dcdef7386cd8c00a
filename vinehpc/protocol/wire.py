"""Wire format: one fixed binary header, a small JSON control part, raw payload frames.

    header   = magic b"VN" | version u8 | code u8 | nframes u16 | ctl_len u32     (10 bytes)
    lengths  = nframes x u64
    control  = ctl_len bytes of UTF-8 JSON (an object)
    frames   = the payloads, back to back (pickles, file bytes: never inside JSON)

Every length is checked against the decoder's limits *before* anything is buffered for it,
so a peer cannot make us allocate more than the limits allow.  Pickles are never touched
here: frames are opaque bytes.  This layer knows codes, not message names or meanings: the
code -> name table is messages.py's, handed to the Decoder.
"""
from __future__ import annotations

import json
import struct

try:        # the fast path for control parts and journal lines (5-8x json's C encoder); optional:
    import orjson           # an interpreter in an image without it falls back to json, same messages
except ImportError:         # pragma: no cover - a dependency; absent only in foreign environments
    orjson = None

MAGIC = b"VN"
VERSION = 5                  # 3: worker-to-worker transfers (info.port, fetch, fetched, want, task.expect, put.ack)
                             # 4: batch (several task or result messages in one)
                             # 5: attempt numbers (task.att, echoed in result, started, outfile, watch): what
                             #    an attempt killed on a worker sends late is told apart from the next one's
HEADER = struct.Struct("!2sBBHI")

MAX_CTL = 1 << 20            # 1 MiB of JSON control per message
MAX_FRAME = 1 << 30          # 1 GiB per payload frame
MAX_FRAMES = 16
PREAUTH_MAX_CTL = 4096       # before the handshake: tiny JSON, no frames at all
CHUNK = 4 << 20              # file transfers are cut into frames of this size
LENGTHS = [struct.Struct("!%dQ" % n) for n in range(MAX_FRAMES + 1)]   # the frame lengths, by count


class ProtocolError(Exception):
    """The peer sent something that is not a valid vinehpc message; close that connection."""


def json_encoder(default):
    """json's C encoder, compact, built once: JSONEncoder.encode builds a new one for every call,
    a few microseconds per message on the hot path (no circular-reference check: what we encode
    is plain data we built).  json's pure-Python encoder where the C one is missing."""
    try:
        from json.encoder import c_make_encoder, encode_basestring_ascii
    except ImportError:     # pragma: no cover - CPython always has it
        c_make_encoder = None
    if c_make_encoder is None:  # pragma: no cover
        return json.JSONEncoder(separators=(",", ":"), default=default).encode
    enc = c_make_encoder(None, default, encode_basestring_ascii, None, ":", ",", False, False, True)
    return lambda obj: "".join(enc(obj, 0))


def fit_text(s: str, budget: int) -> str:
    """The end of `s` that JSON-encodes within `budget` bytes, after a line saying how much was
    cut; measured as json's encoder writes it (ASCII, escaped: the longest form, and what a lone
    surrogate -- undecodable output -- is sent as; orjson's UTF-8 is never longer).  A task's
    captured output is kept to its last MiB of bytes, but escaped (a non-ASCII or control
    character is six bytes, an emoji twelve) it could make a result larger than a message may be:
    the manager would drop the worker for it, and the task would go on to break the next worker
    the same way."""
    if len(s) * 12 <= budget:
        return s
    from json.encoder import encode_basestring_ascii as enc     # what json_encoder uses
    if len(enc(s)) <= budget:
        return s
    room = budget - 200                 # the note's own length
    lo, hi = 0, len(s)                  # the longest tail that fits: between lo and hi characters
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(enc(s[-mid:])) <= room:
            lo = mid
        else:
            hi = mid - 1
    return ("[vinehpc: the first %d characters of this output were cut to fit a message; write large output "
            "to a file output instead]\n%s" % (len(s) - lo, s[len(s) - lo:]))


def _no_default(o):
    raise TypeError("Object of type %s is not JSON serializable" % type(o).__name__)


_json = json_encoder(_no_default)
# orjson would encode these itself, where json refuses them or encodes them its own way (datetimes,
# dataclasses, subclasses of str/int/float/dict/list: numpy's float64): passed through, refused,
# and json's encoder decides as before.  (Enums and UUIDs orjson encodes by value, NaN and
# infinities as null: none is sent -- the limits a task or a setting sends must be finite.)
_STRICT = (orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_SUBCLASS
           if orjson is not None else 0)
json_str = json.encoder.encode_basestring_ascii     # a string as _json encodes it (ASCII, escaped)


def encode(code: int, ctl: dict | None = None, frames=()) -> list:
    """Return the message as a list of buffers (header+lengths+ctl first, then the frames)."""
    out = [encode_head(code, ctl, [len(f) for f in frames])]
    out.extend(frames)
    return out


def encode_head(code: int, ctl: dict, lengths) -> bytes:
    """Header, frame lengths and control part of a message whose frames are sent separately."""
    return head_of(code, encode_ctl(ctl), lengths)


def encode_ctl(ctl: dict | None) -> bytes:
    """A control part as the messages carry it (compact JSON, UTF-8).  orjson where it takes the
    value; what it refuses (an int past 64 bits, a non-string key, a lone surrogate) goes through
    json's encoder as before, which encodes it or raises TypeError as it always did."""
    if not ctl:
        return b"{}"
    if orjson is not None:
        try:
            return orjson.dumps(ctl, option=_STRICT)
        except TypeError:
            pass
    return _json(ctl).encode()


def head_of(code: int, body: bytes, lengths) -> bytes:
    """Header, frame lengths and an encoded control part `body`."""
    head = HEADER.pack(MAGIC, VERSION, code, len(lengths), len(body))
    if lengths:
        head += LENGTHS[len(lengths)].pack(*lengths)
    return head + body


def encode_bytes(code: int, ctl: dict | None = None, frames=()) -> bytes:
    return b"".join(encode(code, ctl, frames))


_scan = json.JSONDecoder().scan_once
# a run of 19 digits, where an int orjson would read as a float can be (below -2**63, above 2**64 - 1),
# and the brackets (see _loads): found in the part with its digits made "0", "[" and "{" made "[" and
# all else " " (one pass; a regular expression cost three times as much)
_SHAPE = bytes(48 if 48 <= i <= 57 else 91 if i in (91, 123) else 32 for i in range(256))
_RUN = b"0" * 19
NESTABLE = 256      # brackets in a part orjson reads (more: json, whose depth limit we keep; see _loads)


def _loads(b):
    """json.loads(bytes(b)) for a control part (bytes or a memoryview): straight to json's
    scanner when the part is plain UTF-8 JSON with nothing around the value (what our encoder
    sends), skipping json.loads' encoding detection and whitespace matching; anything else goes
    through json.loads itself, so what is accepted or refused does not change.

    orjson first where it is there, for what it reads as json would: a part with a run of 19
    digits goes to json (orjson reads an int past 64 bits as a float; json keeps it an int, for
    the messages' checks to refuse), and so does one with more than NESTABLE brackets (orjson
    reads nesting deeper than json's recursion limit -- any depth before 3.9 --, which json
    refuses: a value nested that deep would break whatever walks it later, repr() included).
    What orjson itself refuses (NaN, a lone surrogate) is left to json as before."""
    if orjson is not None:
        b = bytes(b)
        t = b.translate(_SHAPE)
        if _RUN not in t and t.count(b"[") <= NESTABLE:
            try:
                return orjson.loads(b)
            except ValueError:
                pass
    try:
        s = str(b, "utf-8")
        obj, end = _scan(s, 0)
        if end == len(s):
            return obj
    except (ValueError, StopIteration):
        pass
    return json.loads(bytes(b))


class Decoder:
    """Incremental decoder: feed() bytes as they arrive, get complete messages back.

    A message is a tuple (name, ctl_dict, [frame bytes...]), `name` looked up in `names`
    (code -> name; an unknown code is refused from the header alone).  Raises ProtocolError
    on any violation; the caller then closes the connection.
    """

    def __init__(self, names: dict, max_ctl: int = MAX_CTL, max_frame: int = MAX_FRAME, allow_frames: bool = True):
        self.names = names
        self.buf = bytearray()
        self.max_ctl = max_ctl
        self.max_frame = max_frame
        self.allow_frames = allow_frames
        self._need = None   # (name, nframes, ctl_len, frame_lengths, total) of the message being read

    def missing(self) -> int:
        """Bytes still needed to complete the message being read (0 if unknown)."""
        return self._need[4] - len(self.buf) if self._need is not None else 0

    def feed(self, data) -> list:
        """Take `data`; return every message now complete.  next_message's work over the whole
        buffer in one pass, what was taken cut off once: on a large fleet a read carries a few
        small messages, and the per-message layers were a share of the manager's cost per task
        that grew with the fleet (issue 15)."""
        buf = self.buf
        buf += data
        out = []
        pos = 0
        end = len(buf)
        view = memoryview(buf)
        try:
            while True:
                need = self._need or self._head(pos)
                if need is None:
                    break
                total = need[4]
                if end - pos < total:
                    break
                out.append(self._message(view, pos, need))
                pos += total
                self._need = None
        finally:
            view.release()
        if pos:
            del buf[:pos]
        return out

    def push(self, data) -> None:
        """Take `data` without decoding (see next_message)."""
        self.buf += data

    def next_message(self):
        """The next complete message in the buffer, or None.  Taking one at a time lets the
        handshake (handshake.py) stop at its last message: what follows is left in `buf` for
        the authenticated connection, never decoded with the pre-auth limits."""
        need = self._need or self._head()
        if need is None:
            return None
        total = need[4]
        buf = self.buf
        if len(buf) < total:
            return None
        with memoryview(buf) as view:
            msg = self._message(view, 0, need)
        del buf[:total]
        self._need = None
        return msg

    def next_head(self):
        """The next message's (name, ctl, frame lengths) with its frames left unread, or None: the
        caller then takes exactly sum(lengths) bytes itself -- first `take()` from this buffer, then
        from its socket -- before asking for the next message.  For a receiver that puts a large
        payload straight where it goes (a peer's file into the file) without copying it through
        this buffer; the limits are checked as for next_message."""
        need = self._need or self._head()
        if need is None:
            return None
        name, start, ctl_len, lengths, total = need
        if len(self.buf) < start + ctl_len:
            return None
        with memoryview(self.buf) as view:
            ctl = self._ctl(view, start, ctl_len)
        del self.buf[:start + ctl_len]
        self._need = None
        return name, ctl, lengths

    def take(self, k: int) -> bytes:
        """Up to k bytes from the front of the buffer (a payload next_head left unread)."""
        out = bytes(self.buf[:k])
        del self.buf[:k]
        return out

    def _head(self, pos=0):
        """Check the header of the message at `pos` in the buffer (its front) once it is there; its
        (name, start of the control part, ctl_len, frame lengths, total), offsets from `pos`, or None."""
        buf = self.buf
        have = len(buf) - pos
        if have < HEADER.size:
            return None
        magic, version, code, nframes, ctl_len = HEADER.unpack_from(buf, pos)
        if magic != MAGIC:
            raise ProtocolError("bad magic %r: not a vinehpc peer" % bytes(magic))
        if version != VERSION:
            raise ProtocolError("protocol version %d, expected %d: upgrade vinehpc on both sides" % (version, VERSION))
        name = self.names.get(code)
        if name is None:
            raise ProtocolError("unknown message code %d" % code)
        if ctl_len > self.max_ctl:
            raise ProtocolError("control part of %d bytes exceeds the limit %d" % (ctl_len, self.max_ctl))
        if nframes and not self.allow_frames:
            raise ProtocolError("payload frames are not allowed before authentication")
        if nframes > MAX_FRAMES:
            raise ProtocolError("%d frames exceed the limit %d" % (nframes, MAX_FRAMES))
        lens_end = HEADER.size + 8 * nframes
        if have < lens_end:
            return None
        lengths = LENGTHS[nframes].unpack_from(buf, pos + HEADER.size) if nframes else ()
        for n in lengths:
            if n > self.max_frame:
                raise ProtocolError("frame of %d bytes exceeds the limit %d" % (n, self.max_frame))
        self._need = (name, lens_end, ctl_len, lengths, lens_end + ctl_len + sum(lengths))
        return self._need

    def _message(self, view, pos, need):
        """(name, ctl, frames) of the complete message at `pos` whose header gave `need`."""
        name, start, ctl_len, lengths, _ = need
        start += pos
        ctl = self._ctl(view, start, ctl_len)
        frames = []
        start += ctl_len
        for n in lengths:
            frames.append(bytes(view[start:start + n]))     # one copy (a bytearray slice would make two)
            start += n
        return name, ctl, frames

    @staticmethod
    def _ctl(view, start, ctl_len) -> dict:
        try:
            ctl = _loads(view[start:start + ctl_len]) if ctl_len else {}
        except (ValueError, RecursionError) as e:   # RecursionError: "[[[[..." nested past the limit
            raise ProtocolError("control part is not JSON: %s" % e) from None
        if not isinstance(ctl, dict):
            raise ProtocolError("control part must be a JSON object")
        return ctl
