"""The tunnel (userlevel_net: proxy on the compute side, egress on the head side) over real
network namespaces: compute has no route to data, head reaches both (tests/netns_topo.py).

No traffic leaves this machine: every address used is inside our own namespaces.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import base64

import pytest

from conftest import poll
from slurm_fixture import require
import netns_topo
from userlevel_net.egress import Egress, Policy, Rule
from userlevel_net.proxy import start_proxy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIG = 100 << 20
SMALL = 8 << 20
SECRET = "tunnel-test-secret-0123456789"


def _need_bed():
    ok, why = netns_topo.available()
    require(ok, why)
    require(shutil.which("curl") is not None, "needs curl (tests/run.sh installs it)")


# ------------------------------------------------------------------------ the test bed
class Bed:
    pass


def _wait_listening(topo, ns, addr, deadline=20.0):
    end = time.monotonic() + deadline

    def probe():
        while True:
            try:
                socket.create_connection(addr, timeout=1).close()
                return
            except OSError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.05)
    topo.call_in(ns, probe)


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    _need_bed()
    d = tmp_path_factory.mktemp("tunnel")
    www = d / "www"
    www.mkdir()
    b = Bed()
    b.sha = {}
    for name, size in (("big", BIG), ("small", SMALL)):
        h = hashlib.sha256()
        with open(www / name, "wb") as f:
            left = size
            while left:
                chunk = os.urandom(min(left, 4 << 20))
                h.update(chunk)
                f.write(chunk)
                left -= len(chunk)
        b.sha[name] = h.hexdigest()
    secret_file = d / "secret"
    secret_file.write_text(SECRET + "\n")
    os.chmod(secret_file, 0o600)
    topo = netns_topo.Topology()
    procs = []
    b.topo = topo
    try:
        topo.up()
        b.port = 8000
        procs.append(subprocess.Popen(topo.argv(topo.data, sys.executable, "-m", "http.server", str(b.port),
                                                "--bind", topo.data_ip, "--directory", str(www)),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait_listening(topo, topo.head, (topo.data_ip, b.port))
        # the egress as its own process (`vinehpc net gateway`), in the head namespace, where
        # "datahost" resolves (its /etc/netns hosts file): remote DNS is exercised
        b.gw_log = d / "gateway.log"
        b.gateway = _gateway(topo, secret_file, b.gw_log, [])
        procs.append(b.gateway[0])
        b.egress = "%s:%d" % (topo.head_ip, b.gateway[1])
        b.secret_file = secret_file
        b.dir = d
        yield b
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        topo.down()


def _gateway(topo, secret_file, log_path, allow):
    argv = [sys.executable, "-m", "userlevel_net.gateway", "--listen", "%s:0" % topo.head_ip,
            "--secret-file", str(secret_file)]
    for a in allow:
        argv += ["--allow", a]
    log = open(log_path, "ab")
    try:
        p = subprocess.Popen(topo.argv(topo.head, *argv), stdout=subprocess.PIPE, stderr=log, cwd=REPO)
    finally:
        log.close()
    line = p.stdout.readline().decode()
    assert line.startswith("listening "), "gateway did not start: %r; log:\n%s" % (line, open(log_path).read())
    return p, int(line.rsplit(":", 1)[1])


@pytest.fixture
def proxy(bed):
    """A proxy (its own process) in the compute namespace, relaying to the gateway in head."""
    p = bed.topo.call_in(bed.topo.compute, start_proxy, bed.egress, SECRET)
    yield p
    p.stop()


@pytest.fixture
def egress(bed):
    """An in-process Egress listening in the head namespace (for its stats)."""
    made = []

    def make(**kw):
        eg = bed.topo.call_in(bed.topo.head, lambda: Egress(SECRET, host=bed.topo.head_ip, **kw).start())
        made.append(eg)
        return eg
    yield make
    for eg in made:
        eg.stop()


def _proxy_to(bed, eg, secret=SECRET):
    return bed.topo.call_in(bed.topo.compute, start_proxy, "%s:%d" % (bed.topo.head_ip, eg.port), secret)


def _env(p):
    env = dict(os.environ)
    for k in list(env):
        if k.lower().endswith("_proxy"):
            del env[k]
    env.update(p.env)
    return env


def _curl(bed, p, *args, timeout=120):
    """curl in the compute namespace with the proxy's environment; (rc, stdout bytes, stderr)."""
    r = subprocess.run(bed.topo.argv(bed.topo.compute, "curl", "-sS", "--max-time", "100", *args),
                       env=_env(p), stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    return r.returncode, r.stdout, r.stderr.decode(errors="replace")


def _url(bed, name, host=None, port=None):
    return "http://%s:%d/%s" % (host or bed.topo.data_name, port or bed.port, name)


# raw clients, run on a thread inside the compute namespace ------------------------------------
def socks_request(p, host, port, user=None, password=None, methods=b"\x02"):
    """SOCKS5 CONNECT through the proxy. Returns ("noauth", None) / ("auth", status) / ("reply", code)."""
    env = p.env["ALL_PROXY"]
    cred = env.split("//", 1)[1].rsplit("@", 1)[0]
    u, pw = cred.split(":", 1)
    user = u if user is None else user
    password = pw if password is None else password
    with socket.create_connection(("127.0.0.1", p.port), timeout=30) as s:
        s.sendall(b"\x05" + bytes([len(methods)]) + methods)
        ver, m = _exact(s, 2)
        if m == 0xFF:
            return "noauth", None
        s.sendall(b"\x01" + bytes([len(user)]) + user.encode() + bytes([len(password)]) + password.encode())
        _, st = _exact(s, 2)
        if st != 0:
            return "auth", st
        try:
            req = b"\x05\x01\x00\x01" + socket.inet_aton(host)
        except OSError:
            req = b"\x05\x01\x00\x03" + bytes([len(host)]) + host.encode()
        s.sendall(req + struct.pack("!H", port))
        rep = _exact(s, 10)
        return "reply", rep[1]


def http_connect(p, target, auth=True, creds=None):
    """HTTP CONNECT through the proxy; returns the status code."""
    cred = creds or p.env["HTTP_PROXY"].split("//", 1)[1].rsplit("@", 1)[0]
    hdr = "CONNECT %s HTTP/1.1\r\nHost: %s\r\n" % (target, target)
    if auth:
        hdr += "Proxy-Authorization: Basic %s\r\n" % base64.b64encode(cred.encode()).decode()
    with socket.create_connection(("127.0.0.1", p.port), timeout=30) as s:
        s.sendall((hdr + "\r\n").encode())
        buf = b""
        while b"\r\n" not in buf:
            b = s.recv(4096)
            if not b:
                break
            buf += b
        return int(buf.split(b" ", 2)[1])


def _exact(s, n):
    out = b""
    while len(out) < n:
        b = s.recv(n - len(out))
        if not b:
            raise ConnectionError("proxy closed the connection")
        out += b
    return out


# ---------------------------------------------------------------------- unit: allow patterns
def test_allow_patterns():
    assert Policy(None).allowed("anything", 1, "1.2.3.4")
    pol = Policy(["*.cern.ch:1094", "10.0.0.0/8", "data?.example.org:80-90", "[fd00::1]:443", "192.168.1.*"])
    assert pol.may_try("eos.cern.ch", 1094) and pol.allowed("eos.cern.ch", 1094, "188.1.1.1")
    assert not pol.allowed("eos.cern.ch", 1095, "188.1.1.1")
    assert pol.allowed("whatever", 5, "10.3.4.5")                       # CIDR matches the resolved address
    assert pol.allowed("data1.example.org", 85, "1.1.1.1") and not pol.allowed("data1.example.org", 91, "1.1.1.1")
    assert pol.allowed("fd00::1", 443, "fd00::1") and not pol.allowed("fd00::1", 80, "fd00::1")
    assert pol.allowed("192.168.1.7", 22, "192.168.1.7")
    assert not Policy(["*.cern.ch"]).may_try("example.com", 80)          # no DNS for a sure no
    assert Rule("host:*").port_ok(1) and Rule("host").port_ok(65535)
    for bad in ("host:x", "10.0.0.0/99", ":80"):
        with pytest.raises(ValueError):
            Rule(bad)


# ---------------------------------------------------------------------- over namespaces
def test_compute_cannot_reach_data_directly(bed):
    t = bed.topo
    t.call_in(t.head, lambda: socket.create_connection((t.data_ip, bed.port), timeout=5).close())   # head can
    with pytest.raises(OSError):
        t.call_in(t.compute, lambda: socket.create_connection((t.data_ip, bed.port), timeout=3).close())
    r = subprocess.run(t.argv(t.compute, "curl", "-sS", "--noproxy", "*", "--max-time", "5",
                              _url(bed, "small", host=t.data_ip)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=30)
    assert r.returncode != 0 and r.stdout == b""


def test_download_100mb_urllib_through_http_proxy(bed, proxy):
    assert proxy.env["NO_PROXY"] == "localhost,127.0.0.1,::1" and proxy.pid != os.getpid()
    code = ("import hashlib, sys, urllib.request\n"
            "h = hashlib.sha256()\n"
            "with urllib.request.urlopen(sys.argv[1], timeout=60) as r:\n"
            "    for b in iter(lambda: r.read(1 << 20), b''):\n"
            "        h.update(b)\n"
            "print(h.hexdigest())\n")
    r = subprocess.run(bed.topo.argv(bed.topo.compute, sys.executable, "-c", code, _url(bed, "big")),
                       env=_env(proxy), stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=180)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode().strip() == bed.sha["big"]


def test_download_100mb_curl_socks5h_remote_dns(bed, proxy):
    rc, out, err = _curl(bed, proxy, "-x", proxy.env["ALL_PROXY"], _url(bed, "big"))
    assert rc == 0, err
    assert len(out) == BIG and hashlib.sha256(out).hexdigest() == bed.sha["big"]
    # HTTP CONNECT (-p) and absolute-form GET, from the environment only
    for extra in (["-p"], []):
        rc, out, err = _curl(bed, proxy, *extra, _url(bed, "small"))
        assert rc == 0, err
        assert hashlib.sha256(out).hexdigest() == bed.sha["small"]


def test_wrong_proxy_credentials_refused(bed, proxy):
    t = bed.topo
    assert t.call_in(t.compute, socks_request, proxy, t.data_ip, bed.port, password="wrong") == ("auth", 1)
    assert t.call_in(t.compute, socks_request, proxy, t.data_ip, bed.port, user="other") == ("auth", 1)
    assert t.call_in(t.compute, socks_request, proxy, t.data_ip, bed.port, methods=b"\x00") == ("noauth", None)
    assert t.call_in(t.compute, http_connect, proxy, "%s:%d" % (t.data_ip, bed.port), auth=False) == 407
    assert t.call_in(t.compute, http_connect, proxy, "%s:%d" % (t.data_ip, bed.port), creds="vh:nope") == 407
    rc, _, err = _curl(bed, proxy, "-x", "socks5h://someone:guess@127.0.0.1:%d" % proxy.port, _url(bed, "small"))
    assert rc == 97, err
    rc, out, err = _curl(bed, proxy, "-o", "/dev/null", "-w", "%{http_code}", "-x", "http://127.0.0.1:%d" % proxy.port,
                         _url(bed, "small"))
    assert out == b"407"
    # the right ones still work
    assert t.call_in(t.compute, socks_request, proxy, t.data_ip, bed.port) == ("reply", 0)


def test_wrong_secret_refused_by_egress(bed):
    t = bed.topo
    p = t.call_in(t.compute, start_proxy, bed.egress, "not-the-run-secret")
    try:
        assert t.call_in(t.compute, socks_request, p, t.data_ip, bed.port) == ("reply", 0x01)
        assert t.call_in(t.compute, http_connect, p, "%s:%d" % (t.data_ip, bed.port)) == 502
        rc, out, err = _curl(bed, p, "-o", "/dev/null", "-w", "%{http_code}", _url(bed, "small"))
        assert out == b"502"
    finally:
        p.stop()
    deadline = time.monotonic() + 5
    while "authentication failed (wrong secret)" not in bed.gw_log.read_text():
        assert time.monotonic() < deadline, bed.gw_log.read_text()
        time.sleep(0.05)


def test_failures_map_to_errors_while_other_streams_go_on(bed, proxy, tmp_path):
    t = bed.topo
    results = {}
    files = [tmp_path / ("big-%d" % i) for i in range(4)]

    def download(i):
        results[i] = _curl(bed, proxy, "-o", str(files[i]), "-x", proxy.env["ALL_PROXY"], _url(bed, "big"))
    ths = [threading.Thread(target=download, args=(i,)) for i in range(4)]
    for th in ths:
        th.start()
    try:
        # the 4 streams are under way: bytes of each have come through the tunnel
        poll(lambda: all(f.exists() and f.stat().st_size > 0 for f in files) or results, 60, "the downloads to start")
        # closed port on data: refused (SOCKS 0x05, HTTP 502)
        assert t.call_in(t.compute, socks_request, proxy, t.data_ip, 1) == ("reply", 0x05)
        assert t.call_in(t.compute, http_connect, proxy, "%s:1" % t.data_ip) == 502
        rc, out, _ = _curl(bed, proxy, "-o", "/dev/null", "-w", "%{http_code}", _url(bed, "x", port=1))
        assert out == b"502"
        # no route from the head: network unreachable (0x03); unknown name: general failure (0x01)
        assert t.call_in(t.compute, socks_request, proxy, "10.%d.9.9" % t.net, 80) == ("reply", 0x03)
        assert t.call_in(t.compute, socks_request, proxy, "no-such-host.invalid", 80) == ("reply", 0x01)
        assert t.call_in(t.compute, http_connect, proxy, "no-such-host.invalid:80") == 502
    finally:
        for th in ths:
            th.join(150)
    for i in range(4):
        rc, _, err = results[i]
        assert rc == 0, err
        assert hashlib.sha256(files[i].read_bytes()).hexdigest() == bed.sha["big"]


def test_allow_list_denies_at_the_egress(bed, egress):
    t = bed.topo
    eg = egress(allow=["%s:%d" % (t.data_ip, bed.port), "10.%d.2.*:7" % t.net])
    p = _proxy_to(bed, eg)
    try:
        rc, out, err = _curl(bed, p, "-x", p.env["ALL_PROXY"], _url(bed, "small", host=t.data_ip))
        assert rc == 0 and hashlib.sha256(out).hexdigest() == bed.sha["small"], err
        assert t.call_in(t.compute, socks_request, p, t.data_ip, bed.port + 1) == ("reply", 0x02)
        assert t.call_in(t.compute, socks_request, p, "forbidden.example", 80) == ("reply", 0x02)
        assert t.call_in(t.compute, http_connect, p, "%s:22" % t.data_ip) == 403
        assert t.call_in(t.compute, socks_request, p, t.data_ip, 7) == ("reply", 0x05)   # allowed; closed port
        st = eg.stats
        assert st["denied"] == 3 and st["refused"] == 1 and st["opened"] == 1, st
    finally:
        p.stop()
    # and the gateway CLI enforces --allow the same way; a name pattern allows that name (resolved
    # at the egress), not the bare address
    gw, port = _gateway(t, bed.secret_file, bed.dir / "gw-allow.log", ["data*:%d" % bed.port])
    try:
        p = t.call_in(t.compute, start_proxy, "%s:%d" % (t.head_ip, port), SECRET)
        try:
            assert t.call_in(t.compute, socks_request, p, t.data_name, bed.port) == ("reply", 0)
            assert t.call_in(t.compute, socks_request, p, t.data_ip, bed.port) == ("reply", 0x02)
            assert t.call_in(t.compute, socks_request, p, t.data_name, bed.port + 1) == ("reply", 0x02)
        finally:
            p.stop()
    finally:
        gw.terminate()
        assert gw.wait(10) == 0


def test_20_concurrent_streams(bed, egress):
    t = bed.topo
    eg = egress()
    p = _proxy_to(bed, eg)
    try:
        procs = [subprocess.Popen(t.argv(t.compute, "curl", "-sS", "--max-time", "100",
                                         _url(bed, "small", host=t.data_ip)),
                                  env=_env(p), stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(20)]
        outs = [pr.communicate(timeout=150) for pr in procs]
        for pr, (out, err) in zip(procs, outs):
            assert pr.returncode == 0, err
            assert hashlib.sha256(out).hexdigest() == bed.sha["small"]
        deadline = time.monotonic() + 5
        while eg.stats["active"]:
            assert time.monotonic() < deadline, eg.stats     # every stream's sockets released
            time.sleep(0.05)
        st = eg.stats
        assert st["opened"] == 20 and st["bytes_in"] >= 20 * SMALL, st
    finally:
        p.stop()
    assert not p.alive()


def test_proxy_listens_on_loopback_only_and_stops(bed, proxy):
    t = bed.topo
    with pytest.raises(OSError):
        t.call_in(t.compute, lambda: socket.create_connection((t.compute_ip, proxy.port), timeout=3).close())
    proxy.stop()
    assert not proxy.alive()
    with pytest.raises(OSError):
        t.call_in(t.compute, lambda: socket.create_connection(("127.0.0.1", proxy.port), timeout=3).close())


# ------------------------------------------------------------------------ through the engine
FETCH = ("python3 -c \"import hashlib, urllib.request; "
         "print(hashlib.sha256(urllib.request.urlopen('http://%s:%d/%s', timeout=60).read()).hexdigest())\"")


@pytest.mark.timeout(180)
def test_manager_tunnel_gives_compute_node_tasks_a_way_out(bed, tmp_path):
    """Manager(tunnel=True) in the head namespace, a real `vinehpc worker` in compute: a task fetches
    from data only because its proxy variables lead through the worker's proxy to the manager's egress."""
    import vinehpc
    topo = bed.topo
    m = topo.call_in(topo.head, lambda: vinehpc.Manager(port=0, tunnel=True, run_dir=str(tmp_path / "run")))
    worker = subprocess.Popen(topo.argv(topo.compute, sys.executable, "-m", "vinehpc", "worker",
                                        "%s:%d" % (topo.head_ip, m.port), "--secret-file", m.secret_file,
                                        "--cores", "2", "--no-reconnect", "--connect-timeout", "30"))
    try:
        m.wait_for_workers(1, timeout=60)
        tunneled = vinehpc.Task(FETCH % (topo.data_ip, bed.port, "big"))
        direct = vinehpc.Task("env -u http_proxy -u HTTP_PROXY -u ALL_PROXY -u all_proxy " +
                              FETCH % (topo.data_ip, bed.port, "small"))
        direct.set_time_max(30)
        m.submit(tunneled)
        m.submit(direct)
        got = {}
        for _ in range(2):
            t = m.wait(120)
            assert t is not None, "tasks did not come back"
            got[t.id] = t
        assert got[tunneled.id].successful(), (got[tunneled.id].reason, got[tunneled.id].std_output)
        assert got[tunneled.id].std_output.strip() == bed.sha["big"]
        assert not got[direct.id].successful()          # no route from compute to data without the tunnel
        assert m._egress.stats["opened"] >= 1
    finally:
        m.close()
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


# ------------------------------------------------------------------------ on loopback
def _loopback_server(serve):
    """A server on 127.0.0.1 running serve(conn) on a thread per connection, until closed."""
    srv = socket.create_server(("127.0.0.1", 0))

    def accept():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(c,), daemon=True).start()
    threading.Thread(target=accept, daemon=True).start()
    return srv


def _echo_server():
    """A loopback server: each connection gets back what it sends (until EOF)."""
    def serve(c):
        with c:
            while True:
                b = c.recv(1 << 16)
                if not b:
                    return
                c.sendall(b)
    return _loopback_server(serve)


def _socks_echo(p, port, payload: bytes) -> bytes:
    """Open a SOCKS5 stream to 127.0.0.1:port, send payload, half-close, read all back."""
    cred = p.env["ALL_PROXY"].split("//", 1)[1].rsplit("@", 1)[0]
    u, pw = (x.encode() for x in cred.split(":", 1))
    with socket.create_connection(("127.0.0.1", p.port), timeout=30) as s:
        s.sendall(b"\x05\x01\x02\x01" + bytes([len(u)]) + u + bytes([len(pw)]) + pw
                  + b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", port))
        rep = _exact(s, 2 + 2 + 10)
        assert rep[1] == 2 and rep[3] == 0 and rep[5] == 0, rep
        out = bytearray()

        def send():
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        th = threading.Thread(target=send)
        th.start()
        while True:
            b = s.recv(1 << 20)
            if not b:
                break
            out += b
        th.join(30)
        return bytes(out)


def test_ready_connections_survive_an_egress_restart_and_bulk_streams_relay_exactly():
    """The proxy keeps connections to the egress ready (hello received); when the egress restarts
    they are dead, and the next stream must still open (on a fresh connection), not fail.
    Short streams stay on the event loop, long ones (> 1 MB) move to a splicing thread: both
    must relay every byte, both ways, with half-close."""
    srv = _echo_server()
    echo_port = srv.getsockname()[1]
    eg = Egress(SECRET, host="127.0.0.1").start()
    port = eg.port
    p = start_proxy("127.0.0.1:%d" % port, SECRET, in_process=True)
    try:
        assert _socks_echo(p, echo_port, b"hello") == b"hello"
        deadline = time.monotonic() + 10
        while eg.stats["waiting"] < 1:          # the proxy has made ready connections
            assert time.monotonic() < deadline, eg.stats
            time.sleep(0.01)
        eg.stop()
        eg = Egress(SECRET, host="127.0.0.1", port=port).start()
        assert _socks_echo(p, echo_port, b"again") == b"again"
        big = os.urandom(8 << 20)
        results = [None] * 6

        def one(i):
            results[i] = _socks_echo(p, echo_port, big if i % 2 else b"x%d" % i)
        ths = [threading.Thread(target=one, args=(i,)) for i in range(6)]
        for th in ths:
            th.start()
        for th in ths:
            th.join(60)
        for i, r in enumerate(results):
            assert r == (big if i % 2 else b"x%d" % i), (i, None if r is None else len(r))
        deadline = time.monotonic() + 10
        while eg.stats["active"]:                 # the egress counts a stream's bytes when it closes
            assert time.monotonic() < deadline, eg.stats
            time.sleep(0.02)
        st = eg.stats
        assert st["opened"] == 7 and st["bytes_in"] >= 3 * len(big) and st["auth_failed"] == 0, st
    finally:
        p.stop()
        deadline = time.monotonic() + 10
        while eg.stats["active"] or eg.stats["waiting"]:   # every stream and ready connection released
            assert time.monotonic() < deadline, eg.stats
            time.sleep(0.02)
        eg.stop()
        srv.close()


def _recording_origin():
    """A loopback 'origin' that records every byte it receives, answers one HTTP response and
    closes when the client does."""
    got = []

    def serve(c):
        with c:
            data = b""
            while b"\r\n\r\n" not in data:
                b = c.recv(65536)
                if not b:
                    break
                data += b
            c.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            c.settimeout(2)
            try:
                while True:
                    b = c.recv(65536)
                    if not b:
                        break
                    data += b
            except OSError:
                pass
            got.append(data)
    return _loopback_server(serve), got


def test_bad_destinations_and_a_second_pipelined_http_request_stay_at_the_proxy(tmp_path):
    """Port 0 / an empty name are the client's error at the proxy (SOCKS failure, HTTP 400), not
    'wrong secret' at the egress; after a plain-HTTP request without a body, whatever else the
    client sends (a second request with its Proxy-Authorization) does not reach the origin; and
    all of it works in a process holding descriptors above 1024 (no select())."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1500:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]   # every new fd is >= 1100 now
    srv, got = _recording_origin()
    eg = Egress(SECRET, host="127.0.0.1").start()
    p = start_proxy("127.0.0.1:%d" % eg.port, SECRET, in_process=True)
    try:
        port = srv.getsockname()[1]
        assert socks_request(p, "127.0.0.1", 0) == ("reply", 0x01)
        assert http_connect(p, "127.0.0.1:0") == 400
        cred = p.env["HTTP_PROXY"].split("//", 1)[1].rsplit("@", 1)[0]
        auth = "Proxy-Authorization: Basic %s\r\n" % base64.b64encode(cred.encode()).decode()
        one = "GET http://127.0.0.1:%d/a HTTP/1.1\r\nHost: x\r\n%s\r\n" % (port, auth)
        two = "GET http://127.0.0.1:%d/b HTTP/1.1\r\nHost: x\r\n%s\r\n" % (port, auth)
        with socket.create_connection(("127.0.0.1", p.port), timeout=30) as s:
            assert s.fileno() >= 1100
            s.sendall((one + two).encode())
            answer = b""
            while True:
                b = s.recv(65536)
                if not b:
                    break
                answer += b
        assert answer.endswith(b"\r\n\r\nok"), answer
        deadline = time.monotonic() + 10
        while not got:
            assert time.monotonic() < deadline, "the origin saw no request"
            time.sleep(0.02)
        seen = got[0]
        assert seen.startswith(b"GET /a HTTP/1.1\r\n") and b"/b" not in seen, seen
        assert b"Proxy-Authorization" not in seen and b"Connection: close" in seen, seen
        st = eg.stats
        assert st["auth_failed"] == 0 and st["opened"] == 1, st
    finally:
        p.stop()
        eg.stop()
        srv.close()
        for fd in filler:
            os.close(fd)


def test_connections_kept_ready_give_way_when_the_egress_is_full():
    """Proxies keep connections to the egress ready; at the egress's max_streams those give way
    (the oldest is closed) instead of new streams being refused."""
    srv = _echo_server()
    echo_port = srv.getsockname()[1]
    eg = Egress(SECRET, host="127.0.0.1", max_streams=4).start()
    proxies = [start_proxy("127.0.0.1:%d" % eg.port, SECRET, in_process=True) for _ in range(4)]
    try:
        for round_ in range(2):
            for i, p in enumerate(proxies):
                msg = b"r%d-p%d" % (round_, i)
                assert _socks_echo(p, echo_port, msg) == msg
        deadline = time.monotonic() + 10
        while eg.stats["active"]:
            assert time.monotonic() < deadline, eg.stats
            time.sleep(0.02)
        st = eg.stats
        assert st["opened"] == 8 and st["failed"] == 0 and st["waiting"] <= 4, st
    finally:
        for p in proxies:
            p.stop()
        eg.stop()
        srv.close()


BLACKHOLE_DNS = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 53))
print("ready", flush=True)
while True:
    q, _ = s.recvfrom(4096)   # a name server that never answers; it says which name it was asked
    i, labels = 12, []
    while i < len(q) and q[i]:
        labels.append(q[i + 1:i + 1 + q[i]].decode("ascii", "replace"))
        i += 1 + q[i]
    print(".".join(labels), flush=True)
"""


@pytest.mark.timeout(120)
def test_names_nobody_answers_for_do_not_hold_up_other_names(bed, tmp_path):
    """The head's name server never answers (timeout 1 s): 30 streams to such names are under way
    at the egress (the gateway process, on its own resolver threads), and a stream to a name from
    the head's hosts file still opens at once."""
    t = bed.topo
    dns = subprocess.Popen(t.argv(t.head, sys.executable, "-c", BLACKHOLE_DNS), stdout=subprocess.PIPE)
    gw = None
    try:
        assert dns.stdout.readline().strip() == b"ready"
        gw, port = _gateway(t, bed.secret_file, tmp_path / "gw.log", [])
        p = t.call_in(t.compute, start_proxy, "%s:%d" % (t.head_ip, port), SECRET)
        try:
            slow = [None] * 30

            def ask(i):
                slow[i] = t.call_in(t.compute, socks_request, p, "slow-%d.example" % i, 80)
            asked = set()
            threading.Thread(target=lambda: asked.update(line.strip().decode() for line in dns.stdout),
                             daemon=True).start()
            ths = [threading.Thread(target=ask, args=(i,)) for i in range(30)]
            for th in ths:
                th.start()
            # all 30 lookups are under way at the egress's resolver: the name server was asked each name
            poll(lambda: all("slow-%d.example" % i in asked for i in range(30)), 30, "the 30 lookups")
            t0 = time.monotonic()
            assert t.call_in(t.compute, socks_request, p, t.data_name, bed.port) == ("reply", 0)
            took = time.monotonic() - t0
            for th in ths:
                th.join(60)
            assert all(r == ("reply", 0x01) for r in slow), slow          # "dns": general failure
            assert took < 2.5, "a healthy name waited %.1f s behind names nobody answers for" % took
        finally:
            p.stop()
    finally:
        dns.kill()
        dns.wait()
        if gw is not None:
            gw.terminate()
            gw.wait(10)
