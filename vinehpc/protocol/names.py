"""Cache names, checked the same way on both sides (the worker's cache, the manager's staging).

A cache name becomes one file name in a directory that the receiver owns: anything that could
name another place (a slash, a leading dot, "..", a NUL, an empty or very long name) is refused
before it reaches a path.
"""
from __future__ import annotations

SAFE = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")


def check_cachename(n) -> str:
    """n if it is a plain file name of the cache alphabet; ValueError otherwise."""
    if not isinstance(n, str) or not n or len(n) > 200 or n.startswith(".") or not set(n) <= SAFE:
        raise ValueError("bad cache name %r" % (n[:80] if isinstance(n, str) else n,))
    return n
