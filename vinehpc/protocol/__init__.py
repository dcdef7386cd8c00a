"""The wire protocol, a stdlib-only leaf: framing (wire.py), typed messages (messages.py), the
sans-I/O handshake (handshake.py) and the secret's MACs and files (auth.py)."""
from .wire import CHUNK, MAX_CTL, MAX_FRAME, PREAUTH_MAX_CTL, Decoder, ProtocolError
from . import auth, handshake, messages, wire

__all__ = ["CHUNK", "MAX_CTL", "MAX_FRAME", "PREAUTH_MAX_CTL", "Decoder", "ProtocolError",
           "auth", "handshake", "messages", "wire"]
