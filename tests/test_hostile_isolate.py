"""Hostile probes (issue 14), isolation between tasks and of the worker's node: inputs a task
writes to, outputs that are links out of the sandbox, tunnel allow patterns that look like
addresses, daemons that outlive their task, decompression bombs, shared images, stale worker
directories.  Each runs the probe against real processes (a real Manager, real workers, real
sockets) beside honest tasks and asserts the honest results and the probe's refusal.
"""
from __future__ import annotations

import os
import socket
import struct
import sys

import cloudpickle
import pytest

from conftest import close_and_check, diagnose, poll, wait_all

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def ready(m, n):
    try:
        m.wait_for_workers(n, timeout=30)
    except TimeoutError as e:
        pytest.fail(diagnose(m, str(e)), pytrace=False)
    return m


# ====================================================================== 10. tunnel allow patterns
def test_allow_pattern_spellings():
    from userlevel_net.egress import Policy
    pol = Policy(["10.9.8.*:18000", "*.cern.ch:1094", "[fd00::*]:443", "cafe.de:80", "*:22"])
    # an address pattern: addresses only, never a name that merely starts like one
    assert pol.allowed("10.9.8.1", 18000, "10.9.8.1")
    assert pol.allowed("data.example.org", 18000, "10.9.8.7")        # a name resolving into it
    assert not pol.allowed("10.9.8.1.evil.test", 18000, "203.0.113.5")
    assert not pol.allowed("10.9.8.1", 18001, "10.9.8.1")
    # a name pattern: names only, never an address literal nor a resolved address
    assert pol.allowed("eos.cern.ch", 1094, "188.184.1.1")
    assert not pol.allowed("10.1.1.1", 1094, "10.1.1.1")
    assert pol.allowed("cafe.de", 80, "1.2.3.4")                      # hex letters make no address
    assert not pol.allowed("1.2.3.4", 80, "1.2.3.4")
    # IPv6 in brackets: an address pattern
    assert pol.allowed("fd00::1", 443, "fd00::1") and not pol.allowed("fd00::1.evil", 443, "2001:db8::1")
    # `*` is every address (of any name) on that port
    assert pol.allowed("anything.example", 22, "192.0.2.1") and not pol.allowed("anything.example", 23, "192.0.2.1")
    assert pol.may_try("10.9.8.1.evil.test", 18000)        # it may still resolve into the allowed addresses
    assert not Policy(["*.cern.ch:1094"]).may_try("10.9.8.1", 1094)


def _socks_connect(p, host, port):
    cred = p.env["ALL_PROXY"].split("//", 1)[1].rsplit("@", 1)[0]
    u, pw = (x.encode() for x in cred.split(":", 1))
    with socket.create_connection(("127.0.0.1", p.port), timeout=30) as s:
        s.sendall(b"\x05\x01\x02")
        assert s.recv(2) == b"\x05\x02"
        s.sendall(b"\x01" + bytes([len(u)]) + u + bytes([len(pw)]) + pw)
        assert s.recv(2)[1] == 0
        s.sendall(b"\x05\x01\x00\x03" + bytes([len(host)]) + host.encode() + struct.pack("!H", port))
        rep = b""
        while len(rep) < 10:
            b = s.recv(10 - len(rep))
            if not b:
                break
            rep += b
        return rep[1]


def test_address_pattern_does_not_let_a_lookalike_name_through(monkeypatch):
    """A real egress and proxy on loopback: `10.9.8.*:PORT` is allowed; a name that starts like it
    (`10.9.8.1.evil.test`) resolves, by an attacker's DNS, to a loopback service: refused."""
    from userlevel_net.egress import Egress
    from userlevel_net.proxy import start_proxy
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    real = socket.getaddrinfo

    def evil_dns(host, *a, **kw):
        if host.endswith(".evil.test"):
            host = "127.0.0.1"
        return real(host, *a, **kw)
    monkeypatch.setattr(socket, "getaddrinfo", evil_dns)
    eg = Egress("isolate-test-secret-0123456789", host="127.0.0.1",
                allow=["10.9.8.*:%d" % port, "localhost:%d" % port]).start()
    p = start_proxy("127.0.0.1:%d" % eg.port, "isolate-test-secret-0123456789", in_process=True)
    try:
        assert _socks_connect(p, "10.9.8.1.evil.test", port) == 0x02      # not allowed by the ruleset
        assert _socks_connect(p, "localhost", port) == 0x00               # a name pattern: the name
        assert eg.stats["denied"] >= 1
    finally:
        p.stop()
        eg.stop()
        srv.close()


# ====================================================================== 8. outputs that are links out of the sandbox
@pytest.mark.timeout(120)
def test_file_outputs_never_read_through_a_link_out_of_the_sandbox(make_manager, tmp_path):
    from vinehpc import Task
    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE KEY\n")
    m = ready(make_manager(local_workers=2), 2)
    inp = m.declare_buffer(b"from the input\n")
    cases = {   # command -> what the manager's copy of `out` reads (a file, or d/f of a directory), or the refusal
        "echo made here > data.txt; ln -s data.txt out": "made here\n",
        "ln -s in.txt out": "from the input\n",
        "mkdir d; echo in a dir > d/f; ln -s d out": "in a dir\n",
        "mkdir out; echo x > g; ln -s ../g out/f": "x\n",                        # nested, inside the sandbox
        "ln -s %s out" % secret: "outside the task's sandbox",
        "mkdir out; ln -s %s out/f" % secret: "outside the task's sandbox",       # nested in a directory output
        "mkdir -p out/s; ln -s /etc out/s/f": "outside the task's sandbox",
        "ln -s nothing out": "dangling symbolic link",
    }
    tids = {}
    for i, (cmd, want) in enumerate(cases.items()):
        dest = tmp_path / ("out%d" % i)
        t = Task(cmd).add_input(inp, "in.txt").add_output(m.declare_file(str(dest)), "out")
        tids[m.submit(t.set_retries(1))] = (dest, want)
    tmp = m.declare_temp()
    bad_temp = m.submit(Task("mkdir out; ln -s %s out/k" % secret).add_output(tmp, "out").set_retries(1))
    got = wait_all(m, len(tids) + 1, timeout=90)
    for tid, (dest, want) in tids.items():
        t = got[tid]
        if want.endswith("\n"):
            assert t.successful(), (t.command, t.result, t.reason)
            path = dest / "f" if dest.is_dir() else dest
            assert path.read_text() == want, t.command
        else:
            assert t.result == "output missing" and want in t.reason, (t.command, t.result, t.reason)
            assert not dest.exists() or "PRIVATE" not in "".join(
                p.read_text(errors="replace") for p in ([dest] if dest.is_file() else dest.rglob("*")) if p.is_file())
    t = got[bad_temp]
    assert t.result == "output missing" and "outside the task's sandbox" in t.reason, (t.result, t.reason)
    close_and_check(m)
