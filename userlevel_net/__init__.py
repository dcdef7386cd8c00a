"""User-level networking for workers on locked-down compute nodes.

Planned contents (standard library only, so a worker can run it from a packed image):
an outbound-access probe, a tunnel through the manager (SOCKS5 / HTTP CONNECT),
and a slirp4netns user+net namespace runner.
"""
