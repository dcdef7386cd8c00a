"""Worker processes on a rate-limited network on this machine (for benchmarks/peer_transfers.py --rate):
each worker in its own network namespace behind a veth on one bridge, its upload and download
limited by `tc tbf` to the same rate, and the manager's upload (the bridge's own device, where
the root namespace sends into it) too.  So each copy is bound by a link, as on a cluster, not by
this machine's memory and cores.  Needs root and iproute2 (tbf is all this kernel offers, see
/work/shared/HPC-TESTBED.md).
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
import uuid


def _run(*argv):
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=30)
    if r.returncode != 0:
        raise RuntimeError("%s: %s" % (" ".join(argv), r.stdout.strip()))


def _tbf(dev, rate_mbit, ns=None):
    # burst: a few ms at the rate and never below a packet (a smaller one drops everything)
    burst = max(64, rate_mbit * 1000 // 8 // 100)        # kB: 10 ms worth
    _run("tc", *(("-n", ns) if ns else ()), "qdisc", "add", "dev", dev, "root", "tbf", "rate", "%dmbit" % rate_mbit,
         "burst", "%dkb" % burst, "latency", "20ms")


class Net:
    """A bridge at 10.R.0.1 (the manager listens there) and `n` namespaces at 10.R.0.(10+i)."""

    def __init__(self, n, rate_mbit):
        tag = uuid.uuid4().hex[:4]
        self.r = random.randint(100, 250)
        self.bridge = "vpb" + tag
        self.ip = "10.%d.0.1" % self.r
        self.ns = ["vpn-%s-%d" % (tag, i) for i in range(n)]
        self.veth = ["vp%s%d" % (tag, i) for i in range(n)]
        self.rate = rate_mbit
        self.procs = []

    def up(self):
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", self.ip + "/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        _tbf(self.bridge, self.rate)                           # the manager's upload
        for i, (ns, veth) in enumerate(zip(self.ns, self.veth)):
            _run("ip", "netns", "add", ns)
            _run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _run("ip", "link", "set", veth, "master", self.bridge, "up")
            _run("ip", "-n", ns, "addr", "add", "10.%d.0.%d/24" % (self.r, 10 + i), "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _tbf(veth, self.rate)                              # the worker's download
            _tbf("eth0", self.rate, ns)                        # the worker's upload
        return self

    def start_workers(self, n, address, secret_file, workdir):
        """One `vinehpc worker` (1 core) in each of the first n namespaces."""
        env = dict(os.environ, VINEHPC_WORKER_DIR=workdir)
        for ns in self.ns[:n]:
            self.procs.append(subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, "-m", "vinehpc", "worker", address, "--secret-file",
                 secret_file, "--cores", "1", "--no-reconnect", "--connect-timeout", "30"],
                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def stop_workers(self):
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        self.procs = []

    def down(self):
        for p in self.procs:
            p.kill()
        for ns in self.ns:
            subprocess.run(["ip", "netns", "del", ns], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run(["ip", "link", "del", self.bridge], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
