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

from conftest import close_and_check, poll, wait_all
from test_hostile import ready

cloudpickle.register_pickle_by_value(sys.modules[__name__])


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


# ====================================================================== 7. tasks that write to their inputs
def scribble_later(path, marker):
    """A Python task that leaves a thread behind, which appends to its input after it returned."""
    import threading
    import time

    def later():
        time.sleep(0.3)
        os.chmod(path, 0o644)
        with open(path, "a") as f:
            f.write("evil\n")
        open(marker, "w").close()
    path = os.path.realpath(path)
    threading.Thread(target=later, daemon=True).start()
    return "left a writer"


@pytest.mark.timeout(180)
def test_a_task_that_writes_to_its_inputs_never_changes_what_later_tasks_read(make_manager, tmp_path):
    from vinehpc import PythonTask, Task
    d = tmp_path / "indir"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("original a\n")
    (d / "sub" / "b.txt").write_text("original b\n")
    f = tmp_path / "in.txt"
    f.write_text("original f\n")
    m = ready(make_manager(local_workers=1), 1)     # one worker, one core: every task reuses its cache
    din, fin = m.declare_file(str(d), cache=True), m.declare_file(str(f), cache=True)   # kept between tasks
    read = "cat in.txt d/a.txt d/sub/b.txt; find d/ | sort"
    want = "original f\noriginal a\noriginal b\nd/\nd/a.txt\nd/sub\nd/sub/b.txt\n"

    def reader():
        return m.submit(Task(read).add_input(fin, "in.txt").add_input(din, "d"))
    writers = [
        "chmod u+w in.txt; echo evil >> in.txt",                       # a file input, made writable again
        "echo evil >> d/a.txt",                                        # a file inside a directory input
        "chmod -R u+w d; echo evil > d/sub/b.txt; touch d/new",        # deeper, and a new file
        "chmod u+w d; rm -f d/a.txt; echo original a > d/a.txt",       # the same bytes in a new file
    ]
    got = {}
    first = reader()
    got.update(wait_all(m, 1, timeout=60))
    for cmd in writers:
        w = m.submit(Task(cmd).add_input(fin, "in.txt").add_input(din, "d").set_retries(1))
        r = reader()
        got.update(wait_all(m, 2, timeout=60))
        t = got[w]
        assert t.result == "failed" and "modified its input" in t.reason, (cmd, t.result, t.reason)
        t = got[r]
        assert t.successful() and t.std_output == want, (cmd, t.result, t.reason, t.std_output)
    assert got[first].std_output == want
    # a writer the task left behind (a thread in its interpreter) writes after the task ended
    marker = tmp_path / "written"
    w = m.submit(PythonTask(scribble_later, "in.txt", str(marker)).add_input(fin, "in.txt"))
    assert wait_all(m, 1, timeout=60)[w].output == "left a writer"
    poll(lambda: marker.exists(), 30, "the left-behind writer wrote", m=m)
    r = reader()
    t = wait_all(m, 1, timeout=60)[r]
    assert t.successful() and t.std_output == want, (t.result, t.reason, t.std_output)
    recs = close_and_check(m)
    assert [x for x in recs if x.get("event") == "worker error" and "was modified" in x.get("reason", "")]


@pytest.mark.timeout(120)
def test_a_consumer_that_writes_to_a_temp_input_does_not_change_it_for_the_next(make_manager):
    from vinehpc import Task
    m = ready(make_manager(local_workers=1), 1)
    tmp = m.declare_temp()
    m.submit(Task("mkdir out; echo made > out/f").add_output(tmp, "out"))
    got = wait_all(m, 1, timeout=60)
    w = m.submit(Task("chmod -R u+w t; echo evil >> t/f").add_input(tmp, "t").set_retries(1))
    got.update(wait_all(m, 1, timeout=60))
    assert got[w].result == "failed" and "modified its input" in got[w].reason, (got[w].result, got[w].reason)
    r = m.submit(Task("cat t/f").add_input(tmp, "t"))
    t = wait_all(m, 1, timeout=60)[r]
    assert t.successful() and t.std_output == "made\n", (t.result, t.reason, t.std_output)
    close_and_check(m)


# ====================================================================== 11a. a decompression bomb
@pytest.fixture
def small_disk(tmp_path):
    """A 64 MB tmpfs (needs root: mount)."""
    import subprocess
    from slurm_fixture import require
    d = tmp_path / "small"
    d.mkdir()
    ok = os.getuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(d)],
                                             capture_output=True).returncode == 0
    require(ok, "needs root to mount a small tmpfs")
    yield d
    subprocess.run(["umount", "-l", str(d)], capture_output=True)


def _gzip_bomb(path, size):
    """A tar.gz of a few hundred KB holding one file of `size` zero bytes."""
    import gzip
    import tarfile
    zeros = bytes(1 << 20)
    with gzip.open(path, "wb", compresslevel=1) as gz:
        ti = tarfile.TarInfo("zeros")
        ti.size = size
        gz.write(ti.tobuf(format=tarfile.GNU_FORMAT))
        for _ in range(size >> 20):
            gz.write(zeros)
        gz.write(bytes(1024))


@pytest.mark.timeout(120)
def test_a_decompression_bomb_is_refused_before_it_fills_the_disk(make_manager, tmp_path, small_disk, monkeypatch):
    """A crafted manager sends a small compressed tar of 256 MB as a directory input to a worker
    whose disk has 64 MB: refused from the tar's headers, nothing written; the worker serves on."""
    import shutil
    import subprocess
    from vinehpc import Task
    from vinehpc.server import Server
    from conftest import worker_cmd
    bomb = tmp_path / "bomb.tar.gz"
    _gzip_bomb(bomb, 256 << 20)
    assert bomb.stat().st_size < (2 << 20)
    monkeypatch.setattr(Server, "_tar", lambda self, f, n: str(bomb))
    m = make_manager(local_workers=0)
    w = subprocess.Popen(worker_cmd(m, "--workdir", str(small_disk / "w")), stderr=subprocess.DEVNULL)
    try:
        ready(m, 1)
        d = tmp_path / "indir"
        d.mkdir()
        (d / "x").write_text("x")
        used = []
        bad = m.submit(Task("ls d").add_input(m.declare_file(str(d)), "d").set_retries(1))
        honest = {m.submit(Task("echo %d" % i)): "%d\n" % i for i in range(5)}
        got = wait_all(m, 6, timeout=90)
        used.append(shutil.disk_usage(small_disk).used)
        t = got[bad]
        assert t.result == "input missing" and "refusing to unpack" in t.reason, (t.result, t.reason)
        assert {tid: got[tid].std_output for tid in honest} == honest
        assert used[0] < (8 << 20), "%d bytes written on the small disk" % used[0]
    finally:
        close_and_check(m)
        try:
            w.wait(20)
        except subprocess.TimeoutExpired:
            w.kill()
            w.wait()


# ====================================================================== 11c. daemons that outlive their task
def start_daemon():
    """A Python task that double-forks a daemon in its own session, then returns its pid."""
    import subprocess
    out = subprocess.run(["/bin/sh", "-c", "setsid sleep 1000 > /dev/null 2>&1 & echo $!"], capture_output=True,
                         text=True, check=True)
    return int(out.stdout)


@pytest.mark.timeout(120)
def test_processes_a_task_leaves_in_their_own_session_end_with_it(make_manager, tmp_path):
    import psutil
    from vinehpc import PythonTask, Task
    m = ready(make_manager(local_workers=1), 1)
    # a task that waits for its own double-forked helper keeps it while it runs, whatever ends meanwhile
    keeper = m.submit(Task("(setsid sh -c 'sleep 2; echo kept > f' &); for i in $(seq 60); do "
                           "[ -s f ] && break; sleep 0.1; done; cat f"))
    leavers = [m.submit(Task(cmd)) for cmd in (
        "setsid sleep 1000 > /dev/null 2>&1 & echo $!",
        "(setsid sleep 1000 > /dev/null 2>&1 & echo $!)",                  # double fork
        "env -i setsid sleep 1000 > /dev/null 2>&1 & echo $!",             # without the task's marks
        "setsid sh -c 'sleep 1000 & sleep 1000' > /dev/null 2>&1 & echo $!",   # a daemon with a child
    )]
    py = m.submit(PythonTask(start_daemon))
    got = wait_all(m, len(leavers) + 2, timeout=90)
    pids = [int(got[t].std_output) for t in leavers] + [got[py].output]
    try:
        poll(lambda: not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"],
             20, "the processes the tasks left are gone", m=m)
    finally:
        for p in pids:
            try:
                os.kill(p, 9)
            except OSError:
                pass
    t = got[keeper]
    assert t.successful() and t.std_output == "kept\n", (t.result, t.reason, t.std_output)
    close_and_check(m)


# ====================================================================== 11e. a worker killed with -9
@pytest.mark.timeout(120)
def test_a_worker_killed_with_minus_9_leaves_no_directory(make_manager, tmp_path):
    import psutil
    import subprocess
    from conftest import worker_cmd
    shm = tmp_path / "shm"
    shm.mkdir()
    env = dict(os.environ, VINEHPC_WORKER_DIR=str(shm))
    m = make_manager(local_workers=0)

    def start():
        w = subprocess.Popen(worker_cmd(m), env=env, stderr=subprocess.DEVNULL)
        poll(lambda: [d for d in os.listdir(shm) if d.startswith("vinehpc-worker-")] and m.stats["workers"] >= 1,
             30, "the worker joined", m=m)
        return w, psutil.Process(w.pid)

    # its guardian removes it
    w, p = start()
    d = os.listdir(shm)
    from vinehpc import Task
    t = m.submit(Task("echo hi"))
    assert wait_all(m, 1, timeout=30)[t].std_output == "hi\n"
    p.kill()
    w.wait(10)
    (d,) = d
    # emptied but for its log, which the journal names (vinehpc logs)
    poll(lambda: sorted(os.listdir(shm / d)) == [".owner", "worker.log"], 20, "the killed worker's %s emptied" % d, m=m)
    old = os.stat(shm / d / "worker.log").st_mtime - 2 * 86400
    os.utime(shm / d / "worker.log", (old, old))     # as a log left two days ago
    os.utime(shm / d, (old, old))
    # guardian killed too: the next worker on the node removes it
    poll(lambda: m.stats["workers"] == 0, 30, "the manager saw the worker go", m=m)
    w, p = start()
    poll(lambda: d not in os.listdir(shm), 20, "the old log's directory %s removed by the next worker" % d, m=m)
    (left,) = os.listdir(shm)
    for c in p.children():
        if "guardian" in " ".join(c.cmdline()):
            c.kill()
    p.kill()
    w.wait(10)
    assert "cache" in os.listdir(shm / left)
    old = os.stat(shm / left).st_mtime - 3600
    os.utime(shm / left, (old, old))     # as a directory left an hour ago
    w2, p2 = start()
    try:
        poll(lambda: sorted(os.listdir(shm / left)) == [".owner", "worker.log"], 20,
             "the stale directory %s emptied by the next worker" % left, m=m)
        assert len(os.listdir(shm)) == 2        # and its own
    finally:
        close_and_check(m)
        w2.wait(20)
    assert os.listdir(shm) == [left]


# ====================================================================== 11b. a task that modifies a shared image
@pytest.mark.timeout(300)
def test_a_task_that_modifies_its_image_does_not_change_it_for_later_tasks(make_manager, tmp_path, monkeypatch):
    import subprocess
    from vinehpc import Task
    img_path = str(tmp_path / "six.vimg")
    p = subprocess.run([sys.executable, "-m", "vinehpc", "sysimage", "python", "--packages", "six", "-o", img_path],
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr
    monkeypatch.setenv("VINEHPC_LOCAL_DIR", str(tmp_path / "node-local"))      # the workers inherit it
    m = ready(make_manager(local_workers=1), 1)
    img = m.declare_image(img_path)
    probe = "python3 -c 'import six; print(getattr(six, \"EVIL\", \"clean\"))'"

    def run(cmd):
        tid = m.submit(Task(cmd).add_environment(img).set_retries(1))
        return wait_all(m, 1, timeout=120)[tid]
    assert run(probe).std_output == "clean\n"
    t = run('f=$(find "$VINEHPC_IMAGE" -name six.py | head -1); chmod u+w "$f" "$(dirname "$f")"; '
            'echo "EVIL = 1" >> "$f"; rm -rf "$(dirname "$f")/__pycache__"; echo "$f"')
    assert t.std_output.startswith(str(tmp_path / "node-local")), t.std_output
    t = run(probe)
    assert t.successful() and t.std_output == "clean\n", (t.result, t.reason, t.std_output)
    close_and_check(m)


# ====================================================================== 7. the state machines' part (events in, commands out)
def test_worker_state_holds_tasks_that_need_a_dropped_input_until_it_comes_again():
    from vinehpc.worker.events import FileStored, InputSpoiled, KillRequested, StartTask, TaskReceived
    from test_worker_state import _inp, cmd_task, of, worker
    st = worker(cores=1, files={"a": "workflow"})
    assert of(st.handle(TaskReceived(cmd_task(1, inputs=(_inp("a"),)), None), 0.0), StartTask)
    st.handle(TaskReceived(cmd_task(2, inputs=(_inp("a"),)), None), 0.0)      # queued behind it
    st.handle(InputSpoiled("a", "input a was modified"), 1.0)
    assert "a" not in st.files and st.spoiled == {"a": "input a was modified"}
    st.handle(TaskReceived(cmd_task(3, inputs=(_inp("a"),)), None), 1.0)      # sent before the manager heard
    assert [r.state for r in (st.runs[2], st.runs[3])] == ["waiting", "waiting"]
    st.handle(KillRequested(1), 2.0)                                           # a core frees: nothing may start
    assert not [r for r in st.runs.values() if r.state == "running"]
    out = st.handle(FileStored("a", "workflow"), 3.0)                          # sent again
    assert [c.spec.id for c in of(out, StartTask)] == [2] and st.spoiled == {}
    assert st.runs[3].state == "queued"


def test_core_requeues_the_tasks_on_a_worker_that_dropped_an_input_and_sends_it_again(sim_core, tmp_path):
    from vinehpc.core.commands import KillTask, PutFile, SendTask
    from vinehpc.core.events import FileDropped, TaskResult
    from test_core import dispatched, done, infile_factory, logs, new_task, of
    sim = sim_core
    f = infile_factory(tmp_path)(cache=True)
    a = sim.submit(new_task(cores=1).add_input(f, "in"))
    b = sim.submit(new_task(cores=1).add_input(f, "in"))
    other = sim.submit(new_task(cores=1))
    sim.join(1, cores=3)
    sim.schedule()
    assert len(of(sim.take(), PutFile)) == 1
    sim(FileDropped(1, f.cachename(), "input was modified"), 1.0)
    cmds = sim.take()
    assert sorted(c.tid for c in of(cmds, KillTask)) == [a.id, b.id]
    assert {r["task"] for r in logs(cmds, "requeued")} == {a.id, b.id}
    assert sim.state(other) == "running" and sim.state(a) == "ready"
    sim.schedule(1.0)
    cmds = sim.take()
    assert len(of(cmds, PutFile)) == 1 and sorted(t for _, t in dispatched(cmds)) == [a.id, b.id]
    assert sim.core.tasks[a.id].tries == 0          # no retry spent, the worker not blamed
    # sent again to the same worker, numbered: a result of the killed attempt, sent before the
    # kill arrived there (it failed: its input went), is not taken for the new one's
    assert [c.spec.get("att") for c in of(cmds, SendTask)] == [2, 2]
    late = sim(TaskResult(1, a.id, {"status": "failed", "reason": "No such file or directory", "wall": 0.0,
                                    "worker_fault": True}), 2.0)
    assert logs(late, "stale result") and not logs(late, "requeued") and sim.state(a) == "running"
    assert not of(late, SendTask)
    assert done(sim(TaskResult(1, a.id, {"status": "success", "wall": 0.1, "exit_code": 0, "att": 2}), 2.0)) == [a]
    assert a.successful() and a.attempts == 2


@pytest.fixture
def sim_core():
    from test_core import Sim
    return Sim()


def test_seal_sees_what_chmod_and_touch_hide(tmp_path, monkeypatch):
    from vinehpc.worker import seal
    d = tmp_path / "e"
    (d / "s").mkdir(parents=True)
    (d / "s" / "f").write_text("original")
    s = seal.seal(str(d))
    assert oct(os.stat(d / "s").st_mode & 0o777) == "0o555" and not os.stat(d / "s" / "f").st_mode & 0o222
    assert seal.intact(s, str(d))
    st = os.stat(d / "s" / "f")
    os.chmod(d / "s" / "f", 0o644)
    (d / "s" / "f").write_text("evil!!!!")                       # same size
    os.chmod(d / "s" / "f", st.st_mode & 0o777)
    os.utime(d / "s" / "f", ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back: the ctime cannot be
    assert not seal.intact(s, str(d))
    # within one clock tick a write could keep the ctime: a racy entry is compared by its bytes too
    (d / "s" / "f").chmod(0o644)
    (d / "s" / "f").write_text("original")
    s = seal.seal(str(d))
    monkeypatch.setattr(seal, "racy", lambda s: True)
    seal.settle(s, str(d))
    assert s.digest is not None and seal.intact(s, str(d))
    frozen = seal.signature(str(d))
    monkeypatch.setattr(seal, "signature", lambda path: frozen)    # as if the ctime had not moved
    (d / "s" / "f").chmod(0o644)
    (d / "s" / "f").write_text("evil!!!!")
    assert not seal.intact(s, str(d))
