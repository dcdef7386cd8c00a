"""userlevel_net probe and namespace mode (`vinehpc net probe`, `vinehpc net ns`).

No traffic leaves this machine: targets are listening/closed sockets on 127.0.0.1, unresolvable
names are simulated (getaddrinfo patched), and namespaces run with slirp4netns' DNS off
(--dns none) reaching only 10.0.2.2 = this host's loopback.
"""
from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import assert_no_survivors, process_tree
from slurm_fixture import require
from userlevel_net import ns, probe as P

PY = sys.executable
VINE = [PY, "-m", "vinehpc"]


def vine(*args, timeout=60, env=None, **kw):
    return subprocess.run(VINE + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=timeout, env=env, **kw)


@pytest.fixture
def listening():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    yield s.getsockname()[1]
    s.close()


def closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"hello-from-host " + self.server.tag + b"\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture
def http_server():
    """An HTTP server on the host's 127.0.0.1 (seen as 10.0.2.2 inside a slirp namespace)."""
    made = []

    def make(tag=b"a"):
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        srv.tag = tag
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        made.append(srv)
        return srv.server_address[1]
    yield make
    for s in made:
        s.shutdown()
        s.server_close()


# ------------------------------------------------------------------ probe
def test_parse_target():
    assert P.parse_target("example.org:443") == ("example.org", 443)
    assert P.parse_target("[::1]:8080") == ("::1", 8080)
    assert P.parse_target("https://user:pw@data.example:8443/x") == ("data.example", 8443)
    assert P.parse_target("http://data.example/x") == ("data.example", 80)
    for bad in ("nohost", "h:0", "h:70000", "h:x", ":80"):
        with pytest.raises(ValueError):
            P.parse_target(bad)


def test_mask_credentials(monkeypatch):
    assert P.mask_credentials("http://alice:s3cr3t@proxy:3128") == "http://alice:***@proxy:3128"
    assert P.mask_credentials("socks5h://u:p@127.0.0.1:1080/") == "socks5h://u:***@127.0.0.1:1080/"
    assert P.mask_credentials("http://proxy:3128") == "http://proxy:3128"
    for k in list(os.environ):
        if k.lower().endswith("_proxy"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("HTTPS_PROXY", "http://bob:hunter2@site-proxy:3128")
    monkeypatch.setenv("no_proxy", "localhost,.cluster")
    pv = P.proxy_variables()
    assert pv == {"HTTPS_PROXY": "http://bob:***@site-proxy:3128", "no_proxy": "localhost,.cluster"}
    assert "hunter2" not in json.dumps(P.probe([], timeout=1.0))


def test_probe_local_targets(listening, monkeypatch):
    real = socket.getaddrinfo

    def fake(host, *a, **kw):   # an unresolvable name without asking any DNS server
        if host == "no-such-host.invalid":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *a, **kw)
    monkeypatch.setattr(socket, "getaddrinfo", fake)
    refused = closed_port()
    r = P.probe(["127.0.0.1:%d" % listening, "localhost:%d" % refused, "no-such-host.invalid:443"], timeout=2.0)
    json.dumps(r)   # JSON-able
    ok, ref, dns = r["targets"]
    assert ok["status"] == "ok" and ok["ms"] >= 0 and ok["address"] == "127.0.0.1", ok
    assert ref["status"] == "refused" and "Connection refused" in ref["error"], ref
    assert ref["dns"]["ok"] and ({"127.0.0.1", "::1"} & set(ref["dns"]["addresses"])), ref
    assert dns["status"] == "dns" and "no-such-host.invalid" in dns["error"], dns
    assert r["node"] == socket.gethostname() and r["node"] in r["dns"]
    assert r["verdict"] == "partial" and "tunnel=True" in r["suggestion"]
    for k in ("userns", "slirp4netns", "tun"):
        assert isinstance(r[k]["ok"], bool), (k, r[k])
    assert r["seconds"] < 10


def test_probe_verdicts(listening):
    r = P.probe(["127.0.0.1:%d" % listening], timeout=2.0)
    assert r["verdict"] == "direct" and "no tunnel needed" in r["suggestion"]
    r = P.probe(["127.0.0.1:%d" % closed_port()], timeout=2.0)
    assert r["verdict"] == "no-direct-route" and "vinehpc run --tunnel" in r["suggestion"]
    assert P.probe([], timeout=1.0)["verdict"] == "unknown"


def test_probe_timeout_is_bounded(monkeypatch):
    def slow(*a, **kw):
        time.sleep(5)       # not synchronisation: the resolver that does not answer (the probe must not wait)
    monkeypatch.setattr(socket, "getaddrinfo", slow)
    t0 = time.monotonic()
    r = P.resolve("hangs.example", 80, timeout=0.3)
    assert not r["ok"] and "no answer" in r["error"] and time.monotonic() - t0 < 2


def test_render_table():
    rows = [P.probe(["127.0.0.1:%d" % closed_port()], timeout=1.0),
            {"worker": "w2", "host": "node2", "node": "node2", "error": "probe failed: boom"}]
    rows[0]["worker"] = "w1"
    text = P.render_table(rows)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["NODE", "WORKER", "SELF-DNS"] and "VERDICT" in lines[0]
    assert lines[1].split()[0] == socket.gethostname() and "refused" in lines[1]
    assert lines[2].split()[:2] == ["node2", "w2"] and lines[2].rstrip().endswith("error")
    assert lines[0].index("VERDICT") == lines[1].index("no-direct-route")   # aligned
    assert "node2: probe failed: boom" in text and "-> no direct route" in text


def test_cli_probe_json(listening):
    r = vine("net", "probe", "--json", "--timeout", "2", "--target", "127.0.0.1:%d" % listening,
             "-t", "127.0.0.1:%d" % closed_port())
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert isinstance(data, list) and len(data) == 1
    assert [t["status"] for t in data[0]["targets"]] == ["ok", "refused"]
    r = vine("net", "probe", "-t", "127.0.0.1:%d" % listening)
    assert r.returncode == 0 and r.stdout.startswith("NODE") and "direct" in r.stdout, r
    r = vine("net", "probe", "-t", "nohost")
    assert r.returncode == 2 and "HOST:PORT" in r.stderr


# ------------------------------------------------------------------ vinehpc.netprobe.probe_workers (fake manager)
class _FakeTask:
    def __init__(self, t, host, fail=False):
        self.id, self.hostname, self._t, self._fail = None, host, t, fail

    def run(self):
        if self._fail:
            self.exception, self.output = RuntimeError("worker exploded"), None
        else:
            self.exception, self.output = None, self._t.fn(*self._t.args, **self._t.kwargs)


class FakeManager:
    """submit(task, worker=ID, on_done=...) as Manager provides it: runs the task "on" that
    worker (here: a thread) and hands it to on_done; worker 3 never answers."""

    def __init__(self):
        self.pinned, self.cancelled, self._n = [], [], 0

    def workers(self):
        return [{"id": "w1", "host": "n1"}, {"id": "w2", "host": "n2"}, {"id": "w3", "host": "n3"}]

    def submit(self, task, *, worker=None, on_done=None):
        worker_id = worker
        self._n += 1
        self.pinned.append((task, worker_id))
        ft = _FakeTask(task, {"w1": "n1", "w2": "n2", "w3": "n3"}[worker_id], fail=worker_id == "w2")
        ft.id = self._n
        if worker_id != "w3":
            threading.Thread(target=lambda: (ft.run(), on_done(ft)), daemon=True).start()
        return ft.id

    def cancel(self, tid):
        self.cancelled.append(tid)


def test_probe_workers_pins_one_task_per_worker(listening):
    from vinehpc import PythonTask
    from vinehpc.netprobe import probe_workers
    m = FakeManager()
    t0 = time.monotonic()
    rows = probe_workers(m, ["127.0.0.1:%d" % listening], timeout=1.0, deadline=2.0)
    assert time.monotonic() - t0 < 5
    assert [w for _, w in m.pinned] == ["w1", "w2", "w3"]
    assert all(isinstance(t, PythonTask) and t.fn is P.probe for t, _ in m.pinned)
    assert [r["worker"] for r in rows] == ["w1", "w2", "w3"]
    assert rows[0]["targets"][0]["status"] == "ok" and rows[0]["host"] == "n1"
    assert "worker exploded" in rows[1]["error"]
    assert "no answer" in rows[2]["error"] and m.cancelled == [3]
    assert "w3" in P.render_table(rows)


def test_probe_is_picklable_by_reference():
    import pickle
    import cloudpickle
    assert pickle.loads(cloudpickle.dumps(P.probe)) is P.probe


# ------------------------------------------------------------------ namespace mode
def _ns_problem():
    if not shutil.which("slirp4netns"):
        return "slirp4netns is not installed (apt-get install slirp4netns uidmap)"
    r = subprocess.run(["unshare", "--user", "--map-root-user", "--net", "true"], stderr=subprocess.PIPE,
                       text=True, timeout=30)
    if r.returncode != 0:
        return "no unprivileged user+net namespaces here: %s" % r.stderr.strip()
    if not os.access("/dev/net/tun", os.R_OK | os.W_OK):
        return "/dev/net/tun is not accessible"
    return None


@pytest.fixture
def netns():
    problem = _ns_problem()
    require(problem is None, problem or "")


def ns_run(*args, code, timeout=60, env=None):
    return vine("net", "ns", *args, "--", PY, "-c", code, timeout=timeout, env=env)


FETCH = """
import sys, urllib.request
print(urllib.request.urlopen("http://10.0.2.2:%d/", timeout=10).read().decode().strip())
"""

CONNECT = """
import socket, sys
for port in map(int, sys.argv[1:]):
    s = socket.socket(); s.settimeout(5)
    try:
        s.connect(("10.0.2.2", port)); print(port, "ok")
    except OSError as e:
        print(port, type(e).__name__)
    s.close()
"""


def test_ns_reaches_host_loopback_via_slirp(netns, http_server):
    port = http_server(b"ns")
    t0 = time.monotonic()
    r = ns_run("--dns", "none", code=FETCH % port)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "hello-from-host ns"
    assert time.monotonic() - t0 < 15


def test_ns_is_a_separate_network(netns, http_server):
    port = http_server()
    code = ("import socket, subprocess\n"
            "s = socket.socket()\n"
            "try:\n    s.connect(('127.0.0.1', %d)); print('loopback shared')\n"
            "except ConnectionRefusedError:\n    print('own loopback')\n"
            "print(subprocess.run(['ip', '-o', '-4', 'addr', 'show', 'tap0'], capture_output=True, text=True).stdout)\n"
            "print(subprocess.run(['ip', '-o', 'link', 'show', 'tap0'], capture_output=True, text=True).stdout)\n"
            "print(open('/etc/resolv.conf').read().strip())\n" % port)
    r = ns_run("--dns", "none", code=code)
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[0] == "own loopback"
    assert "10.0.2.100/24" in r.stdout and "mtu 65520" in r.stdout
    # default dns=slirp: resolv.conf points at slirp's forwarder (a private mount ns; no query sent)
    r = ns_run(code="print(open('/etc/resolv.conf').read().strip())")
    assert r.returncode == 0 and r.stdout.strip() == "nameserver 10.0.2.3", r
    with open("/etc/resolv.conf") as f:
        assert "10.0.2.3" not in f.read()


def test_ns_exit_code_and_signals(netns):
    assert ns_run("--dns", "none", code="import sys; sys.exit(42)").returncode == 42
    r = ns_run("--dns", "none", code="import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert r.returncode == 128 + 9
    r = vine("net", "ns", "--dns", "none", "--", "no-such-command-xyz")
    assert r.returncode == 127 and "cannot run no-such-command-xyz" in r.stderr
    # SIGTERM to `vinehpc net ns` reaches the command, whose handler decides the status
    code = ("import signal, sys, time\n"
            "signal.signal(signal.SIGTERM, lambda *a: sys.exit(77))\n"
            "print('ready', flush=True); time.sleep(60)\n")
    p = subprocess.Popen(VINE + ["net", "ns", "--dns", "none", "--", PY, "-c", code], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        tree = process_tree([p.pid])            # slirp4netns and the command, while they run
        assert any(q.name() == "slirp4netns" for q in tree), [q.cmdline() for q in tree]
        p.send_signal(signal.SIGTERM)
        assert p.wait(20) == 77
    finally:
        if p.poll() is None:
            p.kill()
    # and slirp4netns is gone with it
    assert_no_survivors(tree, timeout=10, what="processes of `vinehpc net ns`")


def test_ns_tunnel_allows_only_the_proxy(netns, http_server):
    proxy_port, other_port = http_server(b"proxy"), http_server(b"other")
    code = CONNECT + ("import os\nprint(os.environ['HTTPS_PROXY'], os.environ['ALL_PROXY'], os.environ['NO_PROXY'])\n"
                      "import urllib.request\n"
                      "print(urllib.request.urlopen('http://10.0.2.2:%d/', timeout=10).read().decode().strip())\n"
                      % proxy_port)
    r = vine("net", "ns", "--tunnel", str(proxy_port), "--", PY, "-c", code, str(proxy_port), str(other_port))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "%d ok" % proxy_port
    assert lines[1] == "%d ConnectionRefusedError" % other_port     # rejected by the firewall in the ns
    assert lines[2] == "http://10.0.2.2:%d socks5h://10.0.2.2:%d localhost,127.0.0.1,::1" % (proxy_port, proxy_port)
    assert lines[3] == "hello-from-host proxy"
    # without --tunnel, both ports of the host's loopback are reachable
    r = vine("net", "ns", "--dns", "none", "--", PY, "-c", CONNECT, str(proxy_port), str(other_port))
    assert r.stdout.splitlines() == ["%d ok" % proxy_port, "%d ok" % other_port], r


def test_ns_tunnel_env_rewrites_loopback_proxy(netns, http_server):
    port, other = http_server(b"p"), http_server(b"o")
    env = dict(os.environ, HTTPS_PROXY="http://u:pw@127.0.0.1:%d" % port, ALL_PROXY="socks5h://u:pw@127.0.0.1:%d" % port,
               HTTP_PROXY="", http_proxy="")
    code = CONNECT + "import os\nprint(os.environ['https_proxy'])\n"
    r = vine("net", "ns", "--tunnel", "--", PY, "-c", code, str(port), str(other), env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["%d ok" % port, "%d ConnectionRefusedError" % other,
                                     "http://u:pw@10.0.2.2:%d" % port]


def test_ns_tunnel_iptables_fallback(netns, http_server, tmp_path):
    """Without nft on PATH the rules go through iptables."""
    if not shutil.which("iptables"):
        require(False, "iptables is not installed (apt-get install iptables)")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("unshare", "slirp4netns", "iptables", "ip"):
        os.symlink(shutil.which(tool), bindir / tool)
    port, other = http_server(), http_server()
    env = dict(os.environ, PATH=str(bindir))
    r = vine("net", "ns", "--tunnel", str(port), "--", PY, "-c", CONNECT, str(port), str(other), env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["%d ok" % port, "%d ConnectionRefusedError" % other]


def test_ns_through_the_real_tunnel(netns, http_server):
    """The worker's real proxy on the host's loopback: direct access from the namespace is
    blocked, the same server through the tunnel (SOCKS5 and HTTP) works."""
    try:
        from userlevel_net.egress import Egress
        from userlevel_net.proxy import start_proxy
    except ImportError as e:
        pytest.skip("the tunnel is not built yet: %s" % e)
    data = http_server(b"data")
    secret = "s" * 32
    eg = Egress(secret, host="127.0.0.1").start()
    px = start_proxy("127.0.0.1:%d" % eg.port, secret, in_process=True)
    try:
        env = dict(os.environ, **px.env)
        # 127.0.0.1 is in NO_PROXY (inside, it is the namespace's own loopback); here we mean the
        # host's, which only the egress can reach: drop NO_PROXY for this one request
        code = CONNECT + ("import os, urllib.request\n"
                          "os.environ.pop('no_proxy'); os.environ.pop('NO_PROXY')\n"
                          "print(urllib.request.urlopen('http://127.0.0.1:%d/', timeout=10).read().decode().strip())\n"
                          % data)
        r = vine("net", "ns", "--tunnel", "--", PY, "-c", code, str(data), env=env)
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines() == ["%d ConnectionRefusedError" % data, "hello-from-host data"]
    finally:
        px.stop()
        eg.stop()


def test_ns_missing_slirp4netns_is_a_clear_error(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    if shutil.which("unshare"):
        os.symlink(shutil.which("unshare"), bindir / "unshare")
    r = vine("net", "ns", "--", "true", env=dict(os.environ, PATH=str(bindir)))
    assert r.returncode == 125
    assert "slirp4netns is not on PATH" in r.stderr and "apt-get install slirp4netns uidmap" in r.stderr, r.stderr
    assert "Manager(tunnel=True)" in r.stderr


def test_ns_errors_without_namespaces(monkeypatch, tmp_path):
    """unshare failing (user namespaces disabled) -> NsError naming the sysctls and the fallback."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, body in (("unshare", "echo 'unshare: unshare failed: Operation not permitted' >&2; exit 1"),
                       ("slirp4netns", "exit 0")):
        p = bindir / name
        p.write_text("#!/bin/sh\n" + body + "\n")
        p.chmod(0o755)
    monkeypatch.setenv("PATH", str(bindir))
    with pytest.raises(ns.NsError) as ei:
        ns.run(["true"], dns="none", stderr=open(os.devnull, "w"))
    msg = str(ei.value)
    assert "user.max_user_namespaces" in msg and "Manager(tunnel=True)" in msg and "exited 1" in msg


def test_tunnel_env_and_plan(monkeypatch):
    env, allowed = ns.tunnel_env("1080", {})
    assert env["ALL_PROXY"] == "socks5h://10.0.2.2:1080" and env["https_proxy"] == "http://10.0.2.2:1080"
    assert allowed == [("10.0.2.2", 1080)]
    env, allowed = ns.tunnel_env("env", {"https_proxy": "http://a:b@localhost:9000"})
    assert env["HTTPS_PROXY"] == "http://a:b@10.0.2.2:9000" and allowed == [("10.0.2.2", 9000)]
    with pytest.raises(ns.NsError, match="none of"):
        ns.tunnel_env("env", {})
    with pytest.raises(ns.NsError, match="PORT"):
        ns.tunnel_env("nonsense", {})
    steps, tool = ns.firewall_steps([("10.0.2.2", 1080)], tool="nft")
    assert tool == "nft" and "policy drop" in steps[0]["stdin"] and "tcp dport 1080 accept" in steps[0]["stdin"]
    steps, tool = ns.firewall_steps([("10.0.2.2", 1080)], tool="iptables")
    assert steps[1]["argv"][-6:] == ["-d", "10.0.2.2", "--dport", "1080", "-j", "ACCEPT"]
    p = ns.plan(tunnel="1080", environ={})
    assert p["dns"] == "none" and "--disable-dns" in p["slirp_args"] and p["resolv_conf"] is None
    p = ns.plan(environ={})
    assert p["dns"] == "slirp" and "--mount" in p["unshare_args"] and p["steps"] == []


def test_probe_network_on_real_workers(make_manager, listening):
    """Manager.probe_network(): one pinned probe task per connected worker, through real workers."""
    m = make_manager(local_workers=2)
    m.wait_for_workers(2, timeout=30)
    rows = m.probe_network(["127.0.0.1:%d" % listening], timeout=30)
    ids = sorted(w["id"] for w in m.workers())
    assert sorted(r["worker"] for r in rows) == ids, rows
    for r in rows:
        assert "error" not in r, r
        assert r["targets"][0]["status"] == "ok" and r["node"] == socket.gethostname()
    assert m.empty() and m.wait(0.1) is None     # the probes never reach the user's wait()
