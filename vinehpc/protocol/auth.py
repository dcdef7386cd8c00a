"""The run's secret: HMACs over nonces (handshake.py runs the challenge-response with them),
fresh nonces, and secret files readable only by their owner.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets as _secrets

NONCE_BYTES = 32


def new_secret() -> str:
    """A fresh per-run secret (URL-safe text, 256 bits)."""
    return _secrets.token_urlsafe(32)


def nonce() -> str:
    return os.urandom(NONCE_BYTES).hex()


def mac(secret: str, role: str, mine: str, theirs: str) -> str:
    msg = ("%s|%s|%s" % (role, mine, theirs)).encode()
    return hmac.new(secret.encode(), msg, hashlib.sha256).hexdigest()


def check(secret: str, role: str, mine: str, theirs: str, got) -> bool:
    # compare_digest raises TypeError on a str with non-ASCII characters: a stranger's auth with
    # such a MAC killed the manager's I/O thread (found by tests/test_fuzz.py)
    if not isinstance(got, str) or not got.isascii():
        return False
    return hmac.compare_digest(mac(secret, role, mine, theirs), got)


def open_private(path: str, what: str = "secret file"):
    """Open a file for reading, refusing one that other users can read (it holds a secret)."""
    st = os.stat(path)
    if st.st_mode & 0o077:
        raise PermissionError("%s %s is readable by others (mode %o): chmod 600 %s"
                              % (what, path, st.st_mode & 0o777, path))
    return open(path)


def create_private(path: str):
    """Create `path` afresh, mode 0600, for writing (an old file would keep its own mode)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w")


def read_secret(path: str) -> str:
    """Read a secret file, refusing one that other users can read."""
    with open_private(path) as f:
        s = f.read().strip()
    if not s:
        raise ValueError("secret file %s is empty" % path)
    return s


def write_secret(path: str, secret: str) -> None:
    """Write a secret file readable only by us."""
    with create_private(path) as f:
        f.write(secret + "\n")
