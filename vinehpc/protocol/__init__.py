"""Wire protocol: framing (wire.py) and the authentication handshake (auth.py). Stdlib only."""
from .wire import CHUNK, MAX_CTL, MAX_FRAME, PREAUTH_MAX_CTL, Decoder, ProtocolError, encode, encode_bytes
from . import auth

__all__ = ["CHUNK", "MAX_CTL", "MAX_FRAME", "PREAUTH_MAX_CTL", "Decoder", "ProtocolError",
           "encode", "encode_bytes", "auth"]
