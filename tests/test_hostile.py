"""Hostile probes (issue 14): what a task, a worker, a stranger on the port or a careless umask does
must not stop or damage a run.  Each test runs the probe against a real run (a real Manager, real
worker processes, real TCP) beside honest tasks, and asserts the run completes with every honest
result correct and the probe refused with a clear reason.
"""
from __future__ import annotations

import json
import os
import socket
import sys

import cloudpickle
import pytest

import vinehpc
import vinehpc.file
from vinehpc import PythonTask, Task
from vinehpc.protocol import messages, wire

from conftest import close_and_check, diagnose, poll, read_journal, wait_all
from test_e2e import _joined_raw_worker

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def square(x):
    return x * x


def honest(m, n=20):
    """Submit n honest Python tasks: {task id: expected output}."""
    return {m.submit(PythonTask(square, i)): i * i for i in range(n)}


def check_honest(got, expect):
    assert {tid: got[tid].output for tid in expect} == expect


def ready(m, n):
    try:
        m.wait_for_workers(n, timeout=30)
    except TimeoutError as e:
        pytest.fail(diagnose(m, str(e)), pytrace=False)
    return m


# ====================================================================== 1. links out of a directory input
def _dir_with_link(tmp_path, target):
    d = tmp_path / "indir"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("hello\n")
    os.symlink("../a.txt", d / "sub" / "ok")        # a link that stays inside is fine
    os.symlink(target, d / "sub" / "bad")
    return d


@pytest.mark.parametrize("target", ["/etc/passwd", "../../outside", "/"])
def test_directory_input_with_a_link_out_of_it_is_refused_when_declared(make_manager, tmp_path, target):
    m = make_manager(local_workers=0)
    d = _dir_with_link(tmp_path, target)
    with pytest.raises(ValueError, match="symbolic link to .* outside the directory"):
        m.declare_file(str(d))


@pytest.mark.timeout(120)
def test_crafted_tar_with_links_out_fails_its_task_alone(make_manager, tmp_path, monkeypatch):
    """A manager that does not check (as a crafted or buggy one) sends the tar as is: the worker's
    "data" filter refuses it, the task fails with the reason, the worker serves on (not blocked)."""
    m = ready(make_manager(local_workers=2), 2)
    monkeypatch.setattr(vinehpc.file, "check_link", lambda top, rel, name: os.readlink(os.path.join(top, rel, name)),
                        raising=False)
    bad = []
    for target in ("/etc/passwd", "../../../outside"):
        d = _dir_with_link(tmp_path / target.replace("/", "_"), target)
        t = Task("cat d/a.txt").add_input(m.declare_file(str(d)), "d")
        bad.append(m.submit(t.set_retries(1)))
    expect = honest(m, 40)
    got = wait_all(m, len(expect) + len(bad), timeout=90)
    check_honest(got, expect)
    for tid in bad:
        t = got[tid]
        assert t.result == "input missing", (t.result, t.reason)
        assert "link" in t.reason and "cannot store input" in t.reason, t.reason
    assert m.stats["workers"] == 2
    recs = close_and_check(m)
    assert not [r for r in recs if r.get("event") in ("host blocked", "worker lost")]


# ====================================================================== 3. a task that kills its worker
@pytest.mark.timeout(180)
def test_a_task_that_kills_its_worker_fails_after_three_workers(make_manager):
    m = ready(make_manager(local_workers=4), 4)
    poison = m.submit(Task("kill -9 $PPID; sleep 5"))
    expect = {m.submit(Task("echo %d" % i)): "%d\n" % i for i in range(30)}
    got = wait_all(m, len(expect) + 1, timeout=150)
    assert {tid: got[tid].std_output for tid in expect} == expect
    t = got[poison]
    assert t.result == "max retries" and t.reason == "worker lost 3 times while running this task", t.reason
    assert not t.successful()
    recs = read_journal(m)
    assert len([r for r in recs if r.get("event") == "worker lost"]) == 3
    close_and_check(m)


@pytest.mark.parametrize("char", ["\u00e9", "\x01", "\U0001F600"])
def test_a_task_printing_a_mib_of_escaped_characters_fails_nothing(make_manager, char):
    # a MiB of output is kept, but JSON-escaped (6 bytes a character, 12 an emoji) it made a result
    # over the 1 MiB a message may carry: the manager dropped the worker, the task broke the next
    m = ready(make_manager(local_workers=1), 1)
    t = Task("%s -c 'import sys; sys.stdout.write(chr(%d) * 1500000 + \"END\")'" % (sys.executable, ord(char)))
    m.submit(t)
    honest = m.submit(Task("echo fine"))
    got = wait_all(m, 2, timeout=60)
    assert t.successful() and t.std_output.endswith(char * 100 + "END"), t.reason
    assert t.std_output.startswith("[vinehpc: the first ") and "were cut" in t.std_output
    assert got[honest].std_output == "fine\n"
    assert not [r for r in read_journal(m) if r.get("event") == "worker lost"]
    close_and_check(m)


# ====================================================================== 6. `file` messages nobody asked for


def _closed_by_manager(s) -> bool:
    """True once the manager closes the connection (EOF or reset) within the socket's 10 s."""
    s.settimeout(10)
    try:
        while s.recv(65536):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False
    finally:
        s.close()


def _file_msg(cn, data=b"evil"):
    return wire.encode_bytes(messages.CODES["file"], {"cn": cn, "off": 0, "last": True, "size": len(data)}, [data])


@pytest.mark.timeout(120)
def test_file_messages_never_write_outside_staging_nor_unasked(make_manager, tmp_path):
    m = ready(make_manager(local_workers=2), 2)
    expect = honest(m, 30)
    s = _joined_raw_worker(m)
    ready(m, 3)
    s.sendall(_file_msg("temp-0123456789abcdef"))      # a plain name, but nobody asked this worker for it
    poll(lambda: [r for r in read_journal(m, "unasked file")], 20, "the unasked file logged", m=m)
    assert not os.path.exists(os.path.join(m.staging_directory, "temp-0123456789abcdef"))
    assert m.stats["workers"] == 3                      # dropped and logged; the peer may stay
    for cn in ("../../escaped", "..", "a/b", ".hidden"):
        s2 = _joined_raw_worker(m)
        s2.sendall(_file_msg(cn))
        assert _closed_by_manager(s2), "the manager kept a worker that sent a file named %r" % cn
    got = wait_all(m, len(expect), timeout=60)
    check_honest(got, expect)
    recs = close_and_check(m)
    s.close()
    bad = [r for r in recs if r.get("event") == "worker lost" and "not a plain file name" in r.get("reason", "")]
    assert len(bad) == 4, [r for r in recs if r.get("event") == "worker lost"]
    for p in (tmp_path / "escaped", tmp_path.parent / "escaped", os.path.join(m.run_dir, "escaped")):
        assert not os.path.exists(p)
    assert len(read_journal(m, "unasked file")) == 1


# ====================================================================== 8. a temp output that is a link
@pytest.mark.timeout(120)
def test_temp_output_that_is_a_link_is_kept_as_its_target_or_refused(make_manager):
    m = ready(make_manager(local_workers=2), 2)
    inp = m.declare_buffer(b"from the input\n")
    cases = {   # producer command -> what its consumer reads, or the producer's refusal
        "echo made here > data.txt; ln -s data.txt out": "made here\n",
        "mkdir d; echo in a dir > d/f; ln -s d out": "in a dir\n",
        "ln -s in.txt out": "from the input\n",
        "ln -s /etc/hostname out": "outside the task's sandbox",
        "ln -s no-such-file out": "dangling symbolic link",
    }
    producers, consumers = {}, {}
    for cmd, want in cases.items():
        tmp = m.declare_temp()
        p = Task(cmd).add_input(inp, "in.txt").add_output(tmp, "out")
        producers[m.submit(p)] = want
        c = Task("if [ -d x ]; then cat x/f; else cat x; fi").add_input(tmp, "x")
        consumers[m.submit(c)] = want
    expect = honest(m)
    got = wait_all(m, len(expect) + 2 * len(cases), timeout=90)
    check_honest(got, expect)
    for tid, want in producers.items():
        t = got[tid]
        if want.endswith("\n"):
            assert t.successful(), (t.command, t.result, t.reason)
        else:
            assert t.result == "output missing" and want in t.reason, (t.command, t.result, t.reason)
    for tid, want in consumers.items():
        t = got[tid]
        if want.endswith("\n"):
            assert t.successful() and t.std_output == want, (t.result, t.reason, t.std_output)
        else:
            assert t.result == "input missing", (t.result, t.reason)
    close_and_check(m)


# ====================================================================== 9. one interpreter, many tasks
def leave_traces(tag):
    """A task that changes its interpreter: an environment variable, a file in its directory."""
    os.environ["VINEHPC_HOSTILE_TRACE"] = tag
    with open("trace.txt", "w") as f:
        f.write(tag)
    return os.getcwd()


def look_around():
    cwd = os.getcwd()       # raises FileNotFoundError in a deleted directory
    return cwd, os.path.isdir(cwd), sorted(os.listdir(cwd)), os.environ.get("VINEHPC_HOSTILE_TRACE")


@pytest.mark.timeout(120)
def test_python_tasks_in_one_interpreter_start_clean(make_manager):
    m = ready(make_manager(local_workers=1), 1)       # one core: one interpreter runs them all
    buf = m.declare_buffer(b"x")
    seen = []
    for with_files in (True, False, True, False):
        t = PythonTask(leave_traces, "t%d" % len(seen))
        if with_files:
            t.add_input(buf, "in.txt")
        tid = m.submit(t)
        first = wait_all(m, 1, timeout=60)[tid]
        assert first.successful(), first.reason
        tid = m.submit(PythonTask(look_around))
        after = wait_all(m, 1, timeout=60)[tid]
        assert after.successful(), after.reason          # was: FileNotFoundError (a deleted cwd)
        cwd, exists, entries, trace = after.output
        assert exists and entries == [] and trace is None, after.output
        seen += [first.output, cwd]
    sandboxes = {seen[0], seen[4]}                          # the tasks with files ran in their own
    assert len(sandboxes) == 2 and not sandboxes & set(seen[1::2]), seen
    expect = honest(m, 10)
    check_honest(wait_all(m, len(expect), timeout=60), expect)


# ====================================================================== 4. a careless umask
def _modes(top):
    """{relative path: mode} of the run directory and what vinehpc keeps at its top."""
    out = {".": os.stat(top).st_mode & 0o777}
    for e in os.scandir(top):
        out[e.name] = e.stat(follow_symlinks=False).st_mode & 0o777
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("umask", [0o002, 0o022])
def test_run_directory_is_private_whatever_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        run_dir = str(tmp_path / "run")
        for attempt in range(2):            # a run, then its resubmission
            m = vinehpc.Manager(run_dir=run_dir, local_workers=1, resume=True)
            try:
                ready(m, 1)
                expect = honest(m, 5)
                got = wait_all(m, len(expect), timeout=60)
                check_honest(got, expect)
                assert all(t.resumed for t in got.values()) == (attempt == 1)
            finally:
                close_and_check(m)
            modes = _modes(run_dir)
            assert modes["."] == 0o700 and modes["staging"] == 0o700, modes
            assert {"transactions.jsonl", "results.bin", "secret"} <= set(modes), modes
            loose = {n: oct(md) for n, md in modes.items() if n not in (".", "staging") and md & 0o077}
            assert not loose, "files others can read or write in the run directory: %s" % loose
    finally:
        os.umask(old)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name, mode", [("results.bin", 0o664), ("transactions.jsonl", 0o646)])
def test_resume_refuses_a_store_others_can_write(tmp_path, name, mode):
    run_dir = str(tmp_path / "run")
    m = vinehpc.Manager(run_dir=run_dir, local_workers=1, resume=True)
    try:
        ready(m, 1)
        expect = honest(m, 3)
        check_honest(wait_all(m, 3, timeout=60), expect)
    finally:
        close_and_check(m)
    os.chmod(os.path.join(run_dir, name), mode)      # as an older vinehpc left it under umask 002
    with pytest.raises(PermissionError, match="refusing to resume from .*%s is writable by .*chmod 600" % name):
        vinehpc.Manager(run_dir=run_dir, local_workers=0, resume=True)
    os.chmod(os.path.join(run_dir, name), 0o600)     # what the message says to do, once trusted
    m = vinehpc.Manager(run_dir=run_dir, local_workers=1, resume=True)
    try:
        ready(m, 1)
        honest(m, 3)
        got = wait_all(m, 3, timeout=60)
        assert all(t.resumed for t in got.values()) and sorted(t.output for t in got.values()) == [0, 1, 4]
    finally:
        close_and_check(m)


# ====================================================================== 2. a flood of idle strangers
FLOOD_MANAGER = r'''
import json, os, resource, sys, time
resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))
import vinehpc
import vinehpc.admission as admission
from vinehpc import Task
out, run_dir, mode = sys.argv[1], sys.argv[2], sys.argv[3]
if mode != "as shipped":
    admission.MAX_UNAUTHENTICATED = 10 ** 6            # strangers are never closed for newer ones
if mode == "no caps":
    admission.connection_cap = lambda: 10 ** 6         # nor held back: accept() runs out of descriptors
m = vinehpc.Manager(run_dir=run_dir, local_workers=2)
m.wait_for_workers(2, timeout=30)
print(m.port, m.secret_file, flush=True)
sys.stdin.readline()                      # the strangers are connected
want = {}
for i in range(60):
    t = Task("echo %d > o.txt" % i).add_output(m.declare_file(os.path.join(out, "o%d.txt" % i)), "o.txt")
    want[m.submit(t)] = i
got, deadline = {}, time.monotonic() + 90
while len(got) < len(want) and time.monotonic() < deadline:
    t = m.wait(5)
    if t is not None:
        got[t.id] = [t.successful(), t.result, t.reason]
joined = m.wait_for_workers(3, timeout=30)    # a worker started during the flood still gets in
print(json.dumps({"got": {str(k): v for k, v in got.items()}, "n": len(want), "workers": joined}), flush=True)
m.close()
'''


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["as shipped", "no cap on handshakes", "no caps"])
def test_a_thousand_idle_strangers_do_not_stop_the_run(tmp_path, mode):
    """As shipped, strangers beyond 64 in their handshake close the oldest: nothing else notices.
    Without that cap, the cap on connections keeps descriptors for the outputs; without both,
    accept() fails for lack of descriptors and the listening socket is left alone for a moment
    (before: hundreds of thousands of log lines in seconds): outputs may fail then, the run goes on."""
    import subprocess
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if min(hard, 4096) > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))   # our side of the flood
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 1200:
        pytest.skip("cannot open 1,000 sockets here")
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "flood_manager.py"
    script.write_text(FLOOD_MANAGER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (os.path.dirname(os.path.dirname(vinehpc.__file__)),
                                                                   os.environ.get("PYTHONPATH")) if p))
    err = open(tmp_path / "manager.err", "w+")
    proc = subprocess.Popen([sys.executable, str(script), str(out), str(tmp_path / "run"), mode], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    strangers, worker = [], None
    try:
        port, secret_file = proc.stdout.readline().split()
        for _ in range(1100):            # past the limit: the last ones wait in the backlog
            s = socket.socket()
            s.settimeout(0.5)
            try:
                s.connect(("127.0.0.1", int(port)))
            except OSError:
                pass
            strangers.append(s)
        worker = subprocess.Popen([sys.executable, "-m", "vinehpc", "worker", "127.0.0.1:" + port, "--secret-file",
                                   secret_file, "--cores", "1", "--no-reconnect", "--connect-timeout", "20"],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        assert line, "the manager died"
        res = json.loads(line)
        assert proc.wait(timeout=60) == 0
    finally:
        for s in strangers:
            s.close()
        for p in (proc, worker):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    err.seek(0)
    lines = err.read().splitlines()
    assert len(lines) < 200, "%d lines of log, e.g.:\n%s" % (len(lines), "\n".join(lines[:5] + lines[-5:]))
    assert len(res["got"]) == res["n"] and res["workers"] >= 3
    if mode != "no caps":
        bad = {k: v for k, v in res["got"].items() if not v[0]}
        assert not bad, bad
        for i in range(res["n"]):
            assert (out / ("o%d.txt" % i)).read_text() == "%d\n" % i


def test_admission_closes_the_oldest_stranger_and_sums_up_its_logging():
    from vinehpc import admission
    a = admission.Admission(cap=100)
    peers = list(range(admission.MAX_UNAUTHENTICATED + 2))
    evicted = [a.arrived(p) for p in peers]
    assert evicted == [None] * admission.MAX_UNAUTHENTICATED + [0, 1]
    a.authenticated(5)
    assert 5 not in a.waiting and a.room(99) and not a.room(100)
    logged = [a.should_log("no handshake within 10 s", 100.0) for _ in range(25)]
    assert logged == [True] * admission.LOG_BURST + [False] * 15
    assert a.summary(105.0) is None
    assert a.summary(100.0 + admission.LOG_INTERVAL) == (15, {"no handshake within 10 s": 15})
    assert a.should_log("again", 111.0)
    a.pause(200.0)
    assert not a.resume_due(200.5) and a.resume_due(200.0 + admission.ACCEPT_PAUSE) and a.paused_until is None


def test_admission_holds_accept_while_the_handshakes_in_progress_are_young():
    """Thousands of workers connecting at once: beyond MAX_UNAUTHENTICATED handshakes, accept() waits
    (the rest stay in the listen backlog) instead of closing workers that had no time to answer; a
    handshake that ends opens the door again, and so does EVICT_AFTER without any ending (strangers
    hold the slots): then the oldest is closed for a newer one."""
    from vinehpc import admission
    a = admission.Admission(cap=10 ** 6)
    for p in range(admission.MAX_UNAUTHENTICATED):
        assert a.handshake_room(10.0)
        assert a.arrived(p, 10.0) is None
    assert not a.handshake_room(10.5) and a.held
    assert not a.may_listen(10.9)
    a.authenticated(3, 10.9)
    assert a.may_listen(10.9) and not a.held          # a slot freed
    assert a.arrived(100, 10.9) is None
    assert not a.handshake_room(10.95)
    assert not a.may_listen(10.0 + admission.EVICT_AFTER)   # the oldest is old, but handshakes are ending
    t = 10.9 + admission.EVICT_AFTER
    assert a.may_listen(t)                            # none ended for that long: strangers; close the oldest
    assert a.arrived(101, t) == 0
