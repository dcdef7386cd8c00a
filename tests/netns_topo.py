"""A three-namespace test bed for the tunnel (tests/test_tunnel.py, benchmarks/tunnel.py).

    compute (10.R.1.2) ---veth--- (10.R.1.1) head (10.R.2.1) ---veth--- (10.R.2.2) data

head reaches both sides, but does not forward (ip_forward=0) and compute has no route to
10.R.2.0/24: compute cannot reach data directly.  Nothing routes out of this machine: the
namespaces only have their own veth links and loopback.  Names are unique per instance,
and /etc/netns/<head>/{hosts,resolv.conf} give the head its own name table (used by
processes started with `ip netns exec`): "datahost" -> 10.R.2.2, nameserver 127.0.0.1 of
the head (nothing listens there: unknown names fail at once, locally).

Run code inside a namespace either as a subprocess (argv(ns, ...), `ip netns exec`) or on a
thread of this process (call_in(ns, fn)): setns(2) only changes the calling thread, and
sockets, threads and child processes created there stay in that namespace.
"""
from __future__ import annotations

import ctypes
import os
import random
import shutil
import subprocess
import threading
import uuid

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def available() -> tuple:
    """(ok, reason) -- can this process build the topology?"""
    if os.geteuid() != 0:
        return False, "needs root (ip netns)"
    if shutil.which("ip") is None:
        return False, "needs iproute2 (ip)"
    if not hasattr(_libc, "setns"):
        return False, "libc has no setns"
    return True, ""


def _ip(*args, check=True):
    r = subprocess.run(["ip", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError("ip %s: %s" % (" ".join(args), r.stdout.strip()))
    return r


class Topology:
    def __init__(self):
        tag = uuid.uuid4().hex[:6]
        self.tag = tag
        self.compute, self.head, self.data = "vhc-" + tag, "vhh-" + tag, "vhd-" + tag
        r = random.randint(100, 250)
        self.net = r
        self.compute_ip, self.head_ip = "10.%d.1.2" % r, "10.%d.1.1" % r
        self.head_data_ip, self.data_ip = "10.%d.2.1" % r, "10.%d.2.2" % r
        self.data_name = "datahost"
        self._etc = "/etc/netns/" + self.head
        self._up = False

    # --------------------------------------------------------------------- lifecycle
    def up(self) -> "Topology":
        self._up = True
        t = self.tag
        for ns in (self.compute, self.head, self.data):
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("link", "add", "vc" + t, "type", "veth", "peer", "name", "vhc" + t)
        _ip("link", "add", "vd" + t, "type", "veth", "peer", "name", "vhd" + t)
        for dev, ns, addr in (("vc" + t, self.compute, self.compute_ip), ("vhc" + t, self.head, self.head_ip),
                              ("vhd" + t, self.head, self.head_data_ip), ("vd" + t, self.data, self.data_ip)):
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "addr", "add", addr + "/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
        # the head never forwards between its two links
        subprocess.run(["ip", "netns", "exec", self.head, "sysctl", "-qw", "net.ipv4.ip_forward=0"], check=True,
                       timeout=30)
        os.makedirs(self._etc, exist_ok=True)
        with open(os.path.join(self._etc, "hosts"), "w") as f:
            f.write("127.0.0.1 localhost\n%s %s\n" % (self.data_ip, self.data_name))
        with open(os.path.join(self._etc, "resolv.conf"), "w") as f:
            f.write("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        return self

    def down(self) -> None:
        """Remove everything (idempotent, never raises): killing the namespaces' processes first."""
        if not self._up:
            return
        for ns in (self.compute, self.head, self.data):
            r = subprocess.run(["ip", "netns", "pids", ns], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True, timeout=30)
            for pid in r.stdout.split():
                try:
                    os.kill(int(pid), 9)
                except (OSError, ValueError):
                    pass
            _ip("netns", "del", ns, check=False)      # deleting a namespace deletes its veth ends
        shutil.rmtree(self._etc, ignore_errors=True)
        self._up = False

    def __enter__(self):
        try:
            return self.up()
        except BaseException:
            self.down()
            raise

    def __exit__(self, *exc):
        self.down()

    # --------------------------------------------------------------------- running things
    def argv(self, ns: str, *argv) -> list:
        return ["ip", "netns", "exec", ns, *argv]

    def call_in(self, ns: str, fn, *args, **kw):
        """Run fn(*args, **kw) on a new thread inside namespace ns; return its result / raise."""
        out = {}

        def body():
            try:
                fd = os.open("/run/netns/" + ns, os.O_RDONLY)
                try:
                    if _libc.setns(fd, CLONE_NEWNET) != 0:
                        e = ctypes.get_errno()
                        raise OSError(e, "setns(%s): %s" % (ns, os.strerror(e)))
                finally:
                    os.close(fd)
                out["r"] = fn(*args, **kw)
            except BaseException as e:      # handed to the caller
                out["e"] = e

        th = threading.Thread(target=body, name="in-" + ns, daemon=True)
        th.start()
        th.join()
        if "e" in out:
            raise out["e"]
        return out.get("r")
