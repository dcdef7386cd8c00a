"""Local workers (Manager(local_workers=), `vinehpc run`) reach their manager through a Unix
socket in the run directory: real workers, real sockets.  With TLS, or where the run
directory's path is too long for a Unix socket, they use TCP as other workers do."""
from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys

import pytest

import vinehpc
from vinehpc import Task
from vinehpc.comm import unix_address

from conftest import close_and_check, make_manager, read_journal, wait_all  # noqa: F401 (fixture)

SOCK = "workers.sock"


def _run_one(m, cmd="echo hi"):
    t = Task(cmd)
    m.submit(t)
    (done,) = wait_all(m, 1, timeout=60).values()
    assert done.result == "success" and done.output.strip() == "hi"
    return done


def _links(m):
    return [r.get("link") for r in read_journal(m, "worker joined")]


@pytest.mark.timeout(90)
def test_local_workers_join_through_the_unix_socket(make_manager, tmp_path):
    m = make_manager(local_workers=2)
    path = os.path.join(m.run_dir, SOCK)
    assert m.unix_path == path
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    m.wait_for_workers(2, 30)
    assert _links(m) == ["unix", "unix"]
    done = _run_one(m)
    # addrport: where the run's other workers reach its files (its transfer port, on the loopback)
    host, port = done.addrport.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0
    close_and_check(m)
    assert not os.path.exists(path), "the Unix socket outlived its manager"


@pytest.mark.timeout(90)
def test_a_tls_manager_keeps_its_local_workers_on_tls(make_manager):
    m = make_manager(local_workers=1, ssl=True)
    assert m.unix_path is None and not os.path.exists(os.path.join(m.run_dir, SOCK))
    m.wait_for_workers(1, 30)
    assert _links(m) == ["tls"]
    _run_one(m)


@pytest.mark.timeout(90)
def test_a_run_dir_too_long_for_a_unix_socket_gets_an_abstract_one(make_manager, tmp_path):
    # HPC project paths are long: sun_path holds 108 bytes; Linux's abstract namespace has no file
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    m = make_manager(local_workers=1, run_dir=str(deep))
    assert len(os.fsencode(os.path.join(m.run_dir, SOCK))) > 108
    assert m.unix_path.startswith("@vinehpc-%d-" % os.getpid())
    assert not os.path.exists(os.path.join(m.run_dir, SOCK))
    m.wait_for_workers(1, 30)
    assert _links(m) == ["unix"]
    _run_one(m)
    name = m.unix_path
    close_and_check(m)
    with socket.socket(socket.AF_UNIX) as s, pytest.raises(ConnectionRefusedError):
        s.connect(unix_address(name))      # gone with its manager


@pytest.mark.timeout(90)
def test_a_stale_socket_is_replaced_and_a_stranger_file_is_left_alone(make_manager, tmp_path):
    # a manager killed with -9 leaves its socket behind: the next one in that directory replaces it
    stale_dir = tmp_path / "stale"
    stale_dir.mkdir()
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale_dir / SOCK))
    s.close()
    m = make_manager(local_workers=1, run_dir=str(stale_dir))
    assert m.unix_path == str(stale_dir / SOCK)
    m.wait_for_workers(1, 30)
    assert _links(m) == ["unix"]
    _run_one(m)
    # a file that is not a socket is never removed: the workers use TCP
    odd_dir = tmp_path / "odd"
    odd_dir.mkdir()
    (odd_dir / SOCK).write_text("mine")
    m2 = make_manager(local_workers=1, run_dir=str(odd_dir))
    assert m2.unix_path is None
    m2.wait_for_workers(1, 30)
    assert _links(m2) == ["tcp"]
    _run_one(m2)
    assert (odd_dir / SOCK).read_text() == "mine"


@pytest.mark.timeout(60)
def test_a_worker_told_a_unix_socket_where_nothing_listens(tmp_path):
    env = dict(os.environ, VINEHPC_SECRET="x" * 32)
    gone = str(tmp_path / "nothing.sock")
    base = [sys.executable, "-m", "vinehpc", "worker", "127.0.0.1:9", "--unix", gone, "--connect-timeout", "1",
            "--no-reconnect", "--workdir", str(tmp_path / "w")]
    p = subprocess.run(base, env=env, capture_output=True, text=True, timeout=30)
    assert p.returncode == 1
    assert "nothing listens on %s" % gone in p.stderr and "--connect-timeout" in p.stderr
    # a local run's worker: nothing there means its manager is gone, and it leaves quietly
    p = subprocess.run(base + ["--exit-on-refused"], env=env, capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and "Traceback" not in p.stderr


@pytest.mark.timeout(120)
def test_vinehpc_run_workers_use_the_unix_socket(tmp_path):
    script = tmp_path / "tasks.py"
    script.write_text(
        "import vinehpc\n"
        "m = vinehpc.Manager()\n"
        "assert m.wait_for_workers(2, 60) == 2\n"     # (4 echoes could all end before the 2nd joins)
        "for i in range(4):\n"
        "    m.submit(vinehpc.Task('echo %d' % i))\n"
        "n = 0\n"
        "while not m.empty():\n"
        "    t = m.wait(30)\n"
        "    assert t is not None and t.result == 'success', t\n"
        "    n += 1\n"
        "print('DONE', n, m.run_dir, m.unix_path)\n")
    p = subprocess.run([sys.executable, "-m", "vinehpc", "run", "-n", "2", str(script)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=100)
    assert p.returncode == 0, p.stderr
    _, n, run_dir, unix = p.stdout.split()[-4:]
    assert n == "4"
    # (this test's directory is deep: the socket is in the abstract namespace or the run directory)
    assert unix == os.path.join(run_dir, SOCK) or unix.startswith("@vinehpc-")
    assert _links(run_dir) == ["unix", "unix"]
    assert not os.path.exists(os.path.join(run_dir, SOCK))
