"""TLS on the manager's port (Manager(ssl=True) / ssl=(key, cert)): real processes over real TCP.

What must hold: a TLS run returns the right results; nothing readable crosses the wire (a recording
proxy between worker and manager sees neither the command nor its output, where it sees both
without TLS); workers check the manager's certificate by its pinned fingerprint; a worker without
TLS, with TLS against a plain manager, or with a wrong fingerprint, stops with the fix named and
the manager goes on serving; `vinehpc run --ssl` and `vinehpc status` work with it.
"""
from __future__ import annotations

import os
import selectors
import shutil
import socket
import ssl
import subprocess
import sys
import textwrap
import threading

import pytest

import vinehpc
from vinehpc.comm import Connection, file_chunks
from vinehpc.protocol import tls

from conftest import read_journal, wait_all, worker_cmd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = b"MARKER-plain-7c1e"


def _require_openssl():
    """Skip without the openssl command (tests/run.sh installs it) -- but fail in CI."""
    if shutil.which("openssl"):
        return
    if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes", "on"):
        pytest.fail("required in CI: the openssl command (SYSTEM_PACKAGES in tests/run.sh)", pytrace=False)
    pytest.skip("no openssl command")


@pytest.fixture(autouse=True)
def _openssl():
    _require_openssl()


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("VINEHPC_SECRET", "VINEHPC_TLS_FINGERPRINT", "VINEHPC_SSL"):
        env.pop(k, None)
    env.update(extra)
    return env


def _run(cmd, cwd, timeout=60, **env):
    r = subprocess.run(cmd, cwd=cwd, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=timeout)
    return r.returncode, r.stdout


class RecordingProxy:
    """A TCP relay that keeps every byte it passes, in both directions (what a sniffer sees)."""

    def __init__(self, target_port):
        self.target = ("127.0.0.1", target_port)
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.port = self.lsock.getsockname()[1]
        self.to_worker = bytearray()
        self.to_manager = bytearray()
        self.stop_r, self.stop_w = socket.socketpair()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        sel = selectors.DefaultSelector()
        sel.register(self.lsock, selectors.EVENT_READ, None)
        sel.register(self.stop_r, selectors.EVENT_READ, "stop")
        pairs = {}
        while True:
            for key, _ in sel.select(1.0):
                if key.data == "stop":
                    for s in pairs:
                        s.close()
                    sel.close()
                    return
                if key.data is None:
                    a, _ = self.lsock.accept()
                    b = socket.create_connection(self.target, timeout=10)
                    pairs[a], pairs[b] = (b, self.to_manager), (a, self.to_worker)
                    sel.register(a, selectors.EVENT_READ, "x")
                    sel.register(b, selectors.EVENT_READ, "x")
                    continue
                s = key.fileobj
                if s not in pairs:
                    continue            # closed with its other half earlier in this batch
                other, record = pairs[s]
                try:
                    data = s.recv(1 << 16)
                    if data:
                        record += data
                        other.sendall(data)
                except OSError:
                    data = b""
                if not data:
                    for x in (s, other):
                        sel.unregister(x)
                        pairs.pop(x)
                        x.close()

    def close(self):
        self.stop_w.send(b"x")
        self.thread.join(10)
        self.lsock.close()


def _joined_worker(m, port, *extra, env=None):
    cmd = worker_cmd(m, *extra)
    cmd[4] = "127.0.0.1:%d" % port
    return subprocess.Popen(cmd, env=_env(**(env or {})), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _finish(p, timeout=30):
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, _ = p.communicate(10)
    return p.returncode, out


# ------------------------------------------------------------------ a run, and what the wire shows
@pytest.mark.parametrize("use_ssl", [False, True], ids=["plain", "tls"])
def test_a_tls_run_is_right_and_its_traffic_unreadable(make_manager, tmp_path, use_ssl):
    """The same run with and without TLS, through a recording proxy: the capture shows the
    command, an input file's bytes and the outputs without TLS (so the check can fail), none of
    them with it."""
    m = make_manager(ssl=use_ssl, host="127.0.0.1")
    assert m.using_ssl is use_ssl
    data = tmp_path / "in.txt"
    data.write_bytes(MARKER + b"-input\n")
    proxy = RecordingProxy(m.port)
    w = _joined_worker(m, proxy.port)       # --secret-file RUN_DIR/secret: the fingerprint is beside it
    try:
        m.wait_for_workers(1, timeout=30)
        ts = []
        for i in range(5):
            t = vinehpc.Task("cat in.txt; echo %s-out-$((%d*7))" % (MARKER.decode(), i))
            t.add_input(m.declare_file(str(data)), "in.txt")
            ts.append(m.submit(t))
        got = wait_all(m, 5, 60)
        for i, tid in enumerate(ts):
            assert got[tid].successful(), got[tid].result
            assert got[tid].output == "%s-input\n%s-out-%d\n" % (MARKER.decode(), MARKER.decode(), i * 7)
    finally:
        m.close()
        _finish(w)
        proxy.close()
    wire = bytes(proxy.to_worker) + bytes(proxy.to_manager)
    assert len(proxy.to_worker) > 500 and len(proxy.to_manager) > 200     # the proxy did carry the run
    assert (MARKER in wire) is (not use_ssl)
    assert (b"-out-28" in proxy.to_manager) is (not use_ssl)
    if use_ssl:
        # the announcement in plaintext, then TLS records only (0x16: handshake, 0x17: data)
        assert bytes(proxy.to_worker).startswith(tls.ANNOUNCE)
        assert proxy.to_worker[len(tls.ANNOUNCE)] == 0x16 and proxy.to_manager[0] == 0x16
        assert b"hello" not in bytes(proxy.to_worker)[len(tls.ANNOUNCE):]


def test_local_workers_and_python_tasks_with_ssl(make_manager):
    m = make_manager(ssl=True, local_workers=2)
    m.wait_for_workers(2, timeout=30)
    t = m.submit(vinehpc.PythonTask(pow, 2, 20))
    big = m.submit(vinehpc.Task("head -c 500000 /dev/zero | tr '\\0' x"))     # a larger output, several records
    got = wait_all(m, 2, 60)
    assert got[t].output == 1 << 20
    assert got[big].output == "x" * 500000
    key = os.path.join(m.run_dir, "tls-key.pem")
    assert os.stat(key).st_mode & 0o777 == 0o600
    with open(os.path.join(m.run_dir, tls.FINGERPRINT_FILE)) as f:
        assert f.read().strip() == m.tls_fingerprint
    assert read_journal(m, "manager started")[0]["tls"] == m.tls_fingerprint


def test_a_users_own_pair_and_openssls_fingerprint(make_manager, tmp_path):
    key, cert = str(tmp_path / "k.pem"), str(tmp_path / "c.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", "/CN=mine"], check=True, capture_output=True, timeout=60)
    said = subprocess.run(["openssl", "x509", "-in", cert, "-noout", "-fingerprint", "-sha256"], check=True,
                          capture_output=True, text=True).stdout
    m = make_manager(ssl=(key, cert), local_workers=1)
    assert m.using_ssl and m.tls_fingerprint == tls.normalize_fingerprint(said)     # openssl's own view
    t = m.submit(vinehpc.Task("echo mine"))
    assert wait_all(m, 1, 60)[t].output == "mine\n"


# ------------------------------------------------------------------ refusals: the fix named, the manager lives
def _manager_still_serves(m):
    w = _joined_worker(m, m.port)
    try:
        t = m.submit(vinehpc.Task("echo still"))
        assert wait_all(m, 1, 60)[t].output == "still\n"
    finally:
        m.close()
        _finish(w)


def test_a_wrong_fingerprint_is_refused_and_the_manager_lives(make_manager):
    m = make_manager(ssl=True, host="127.0.0.1")
    bad = "sha256:" + "ab" * 32
    code, out = _finish(_joined_worker(m, m.port, "--tls-fingerprint", bad))
    assert code == 2, out
    assert "not the run's" in out and m.tls_fingerprint in out and bad in out, out
    _manager_still_serves(m)


def test_a_worker_without_tls_is_told_and_the_manager_lives(make_manager):
    m = make_manager(ssl=True, host="127.0.0.1")
    cmd = worker_cmd(m)
    i = cmd.index("--secret-file")
    del cmd[i:i + 2]            # the secret from the environment: no fingerprint file beside it
    p = subprocess.Popen(cmd, env=_env(VINEHPC_SECRET=m.secret), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    code, out = _finish(p)
    assert code == 2, out
    assert "uses TLS" in out and "--tls-fingerprint" in out, out
    _manager_still_serves(m)
    closed = [r["reason"] for r in read_journal(m, "connection closed")]
    assert any("TLS handshake" in r for r in closed), closed


def test_a_wrong_secret_inside_tls_is_still_called_so(make_manager):
    """TLS first, then the secret's handshake as without TLS: its refusal reads the same."""
    m = make_manager(ssl=True, host="127.0.0.1")
    p = subprocess.Popen([sys.executable, "-m", "vinehpc", "worker", "127.0.0.1:%d" % m.port, "--connect-timeout",
                          "10"], env=_env(VINEHPC_SECRET="wrong-secret-0123456789",
                                          VINEHPC_TLS_FINGERPRINT=m.tls_fingerprint),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    code, out = _finish(p)
    assert code == 2 and "secret is wrong" in out, out
    assert read_journal(m, "rejected"), read_journal(m)
    _manager_still_serves(m)


def test_a_stranger_speaking_plaintext_to_a_tls_manager_is_dropped(make_manager):
    """Garbage where the TLS handshake belongs: closed and logged, the run goes on."""
    m = make_manager(ssl=True, host="127.0.0.1")
    with socket.create_connection(("127.0.0.1", m.port), timeout=10) as s:
        got = b""
        while len(got) < len(tls.ANNOUNCE):
            got += s.recv(4096)
        s.sendall(b"GET / HTTP/1.0\r\n\r\n" * 10)
        try:
            assert s.recv(4096) == b""          # closed (or reset, below): never a plaintext answer
        except ConnectionResetError:
            pass
    assert got == tls.ANNOUNCE
    _manager_still_serves(m)
    closed = [r["reason"] for r in read_journal(m, "connection closed")]
    assert any("TLS handshake failed" in r for r in closed), closed


def test_a_tls_worker_meeting_a_plain_manager_says_so(make_manager):
    m = make_manager(host="127.0.0.1")
    code, out = _finish(_joined_worker(m, m.port, "--tls-fingerprint", "sha256:" + "cd" * 32))
    assert code == 2, out
    assert "does not use TLS" in out, out


def test_openssl_missing_is_said_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="openssl.*ssl=\\(key_file, cert_file\\)"):
        vinehpc.Manager(ssl=True, run_dir=str(tmp_path / "run"))


# ------------------------------------------------------------------ vinehpc run --ssl, vinehpc status
def test_vinehpc_run_with_ssl_and_status(tmp_path):
    s = tmp_path / "tasks.py"
    s.write_text(textwrap.dedent("""
        import subprocess, sys, vinehpc as vine
        m = vine.Manager(ssl=sys.argv[1:] == ["own"])
        print("ssl", m.using_ssl)
        t = m.submit(vine.Task("echo fine"))
        print(m.wait(30).output.strip())
        r = subprocess.run([sys.executable, "-m", "vinehpc", "status", m.run_dir, "--json"], capture_output=True,
                           text=True, timeout=60)
        print("status", r.returncode, '"source": "manager"' in r.stdout, r.stderr.strip()[-300:])
        m.close()
    """))
    # --ssl; VINEHPC_SSL=1; neither, the script's own Manager(ssl=True) (its workers start after it)
    for how, env, arg in ((["--ssl"], {}, []), ([], {"VINEHPC_SSL": "1"}, []), ([], {}, ["own"])):
        code, out = _run([sys.executable, "-m", "vinehpc", "run", "-n", "1", "--progress", "never", *how, str(s), *arg],
                         tmp_path, timeout=120, **env)
        assert code == 0, out
        assert "ssl True" in out and "fine" in out, out
        assert "status 0 True" in out, out


def test_a_contact_file_carries_the_fingerprint(make_manager, tmp_path):
    """`vinehpc worker --contact` and `vinehpc status contact.json` (a pilot's way in) get the pin from it."""
    from launcher.contact import write_contact
    m = make_manager(ssl=True, host="127.0.0.1")
    d = tmp_path / "pilot"
    d.mkdir()
    contact = write_contact(str(d), "127.0.0.1:%d" % m.port, m.secret, tls_fingerprint=m.tls_fingerprint)
    w = subprocess.Popen([sys.executable, "-m", "vinehpc", "worker", "--contact", contact, "--no-reconnect",
                          "--connect-timeout", "20"], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    try:
        t = m.submit(vinehpc.Task("echo via-contact"))
        assert wait_all(m, 1, 60)[t].output == "via-contact\n"
        code, out = _run([sys.executable, "-m", "vinehpc", "status", contact, "--json"], ROOT)
        assert code == 0 and '"source": "manager"' in out, out
    finally:
        m.close()
        _finish(w)


def test_status_without_the_fingerprint_is_refused_with_the_fix(make_manager):
    m = make_manager(ssl=True, host="127.0.0.1")
    code, out = _run([sys.executable, "-m", "vinehpc", "status", "127.0.0.1:%d" % m.port, "--secret-file",
                      m.secret_file], ROOT)
    assert code == 3, out
    assert "uses TLS" in out and "--tls-fingerprint" in out, out
    code, out = _run([sys.executable, "-m", "vinehpc", "status", "127.0.0.1:%d" % m.port, "--secret-file",
                      m.secret_file, "--tls-fingerprint", m.tls_fingerprint, "--json"], ROOT)
    assert code == 0 and '"source": "manager"' in out, out


# ------------------------------------------------------------------ the connection over TLS, non-blocking
def _tls_pair(tmp_path):
    """Two connected non-blocking TLS sockets (server, client) with their handshake done."""
    key, cert = tls.generate_pair(str(tmp_path))
    srv = tls.ServerTLS(key, cert)
    a, b = socket.socketpair()
    box = {}
    th = threading.Thread(target=lambda: box.setdefault("c", tls.wrap_client(b, srv.fingerprint)))
    th.start()
    s = srv.wrap(a)
    s.settimeout(10)
    s.do_handshake()
    th.join(10)
    return s, box["c"]


def test_connection_over_tls_moves_streams_and_many_small_messages(tmp_path):
    """Both ends non-blocking, a selectors loop as the manager's and worker's: a 9 MB file (FileRange
    read through the TLS object, not sendfile), then 3000 small messages queued behind it; all
    arrive in order, none stuck in the TLS object's buffer (pending()) while select() sleeps."""
    s, c = _tls_pair(tmp_path)
    src = tmp_path / "big.bin"
    payload = os.urandom(9 << 20)
    src.write_bytes(payload)
    tx, rx = Connection(s), Connection(c)
    assert tx.tls and rx.tls
    tx.send_stream(file_chunks(open(src, "rb"), "file", {"cn": "big"}))
    for i in range(3000):
        tx.send("cached", {"cn": "n%d" % i})
    sel = selectors.DefaultSelector()
    sel.register(rx.sock, selectors.EVENT_READ, rx)
    sel.register(tx.sock, selectors.EVENT_WRITE, tx)
    body, names = bytearray(), []
    while len(names) < 3000:
        events = sel.select(10)
        assert events, "stalled: %d bytes, %d messages" % (len(body), len(names))
        for key, _ in events:
            if key.data is tx:
                if tx.flush():
                    sel.unregister(tx.sock)
                continue
            for name, ctl, frames in rx.read():
                if name == "file":
                    body += b"".join(bytes(f) for f in frames)
                else:
                    names.append(ctl["cn"])
    assert bytes(body) == payload
    assert names == ["n%d" % i for i in range(3000)]
    tx.close()
    rx.close()


def test_fingerprints_normalize_and_refuse_nonsense():
    h = "ab" * 32
    assert tls.normalize_fingerprint(h.upper()) == "sha256:" + h
    assert tls.normalize_fingerprint("SHA256 Fingerprint=" + ":".join([h[i:i + 2].upper()
                                                                         for i in range(0, 64, 2)])) == "sha256:" + h
    with pytest.raises(ValueError):
        tls.normalize_fingerprint("sha256:xyz")
    assert ssl.HAS_TLSv1_3 or ssl.HAS_TLSv1_2


# ------------------------------------------------------------------ a pilot with --ssl (mpiexec, no Slurm)
pytest_plugins = ["slurm_fixture"]      # the `mpi` fixture (MPICH's mpiexec), as tests/test_pilot.py


@pytest.mark.timeout(180)
def test_mpiexec_pilot_with_ssl(mpi, tmp_path):
    """Rank 0 makes the pair before any worker starts; the other rank's workers get the
    fingerprint with the secret and join over TLS; the end-of-run release speaks TLS too."""
    s = tmp_path / "tasks.py"
    s.write_text(textwrap.dedent("""
        import vinehpc as vine
        m = vine.Manager()
        print("ssl", m.using_ssl)
        for i in range(6):
            m.submit(vine.Task("echo pilot-%d" % i))
        print(sorted(m.wait(60).output.strip() for _ in range(6)))
        m.close()
    """))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_", "PMIX_", "VINEHPC_"))}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([mpi, "-n", "2", sys.executable, "-m", "vinehpc", "pilot", "--ssl", "--run-dir",
                        str(tmp_path / "run"), str(s)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=150)
    assert r.returncode == 0, r.stdout
    assert "ssl True" in r.stdout, r.stdout
    assert str(["pilot-%d" % i for i in range(6)]) in r.stdout, r.stdout
    recs = read_journal(str(tmp_path / "run" / "manager-0"))
    started = [x for x in recs if x["event"] == "manager started"]
    assert started and started[0]["tls"].startswith("sha256:"), started
    assert [x for x in recs if x["event"] == "worker joined"], recs[-10:]
    assert not [x for x in recs if x["event"] == "connection closed"], recs
