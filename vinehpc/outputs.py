"""Task outputs on the manager's side (the I/O thread); comm/receive.py writes them."""


def discard(f):
    """A connection closed while a file was arriving (a comm.receive.Incoming): nothing stays."""
    f.abort()
