"""The first hour of a new user, each stumble reproduced with real processes (issue 13).

Scripts are written to tmp_path and run as a user would run them (python3 SCRIPT, vinehpc run,
vinehpc worker); each test times the whole process and reads what it printed.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("VINEHPC_SECRET", None)
    env.update(extra)
    return env


def run(cmd, cwd, timeout=60, **env):
    """Run cmd to its end; returns (exit code, stdout+stderr, seconds)."""
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=cwd, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=timeout)
    return r.returncode, r.stdout, time.monotonic() - t0


def script(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ a manager never closed
def test_unclosed_manager_with_local_workers_exits_promptly(tmp_path):
    s = script(tmp_path, "noclose.py", """
        import vinehpc as vine
        m = vine.Manager(local_workers=2)
        m.submit(vine.Task("echo hi"))
        print(m.wait(30).std_output.strip())
    """)
    code, out, took = run([sys.executable, s], tmp_path)
    assert code == 0, out
    assert out.strip() == "hi", out          # nothing else: no worker complaining the manager was lost
    assert took < 8, "took %.1f s to exit" % took


def test_unclosed_manager_on_a_fixed_port_with_a_hand_started_worker(tmp_path):
    port = free_port()
    s = script(tmp_path, "fixed.py", """
        import sys, vinehpc as vine
        m = vine.Manager(%d, run_dir=sys.argv[1])
        m.wait_for_workers(1, timeout=30)
        for i in range(5):
            m.submit(vine.Task("echo %%d" %% i))
        while not m.empty():
            m.wait(10)
        print("all done")
    """ % port)
    run_dir = str(tmp_path / "run")
    env = _env()
    mgr = subprocess.Popen([sys.executable, s, run_dir], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    secret = os.path.join(run_dir, "secret")
    deadline = time.monotonic() + 20
    while not os.path.exists(secret) and time.monotonic() < deadline:
        time.sleep(0.05)
    t0 = time.monotonic()
    w = subprocess.Popen([sys.executable, "-m", "vinehpc", "worker", "127.0.0.1:%d" % port, "--secret-file", secret],
                         cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = mgr.communicate(timeout=40)
        wout, _ = w.communicate(timeout=20)
    finally:
        for p in (mgr, w):
            if p.poll() is None:
                p.kill()
    took = time.monotonic() - t0
    assert mgr.returncode == 0, out
    assert "all done" in out
    assert "could not acquire lock" not in out and "Fatal Python error" not in out, out
    assert w.returncode == 0, wout
    assert "lost the manager" not in wout, wout
    assert took < 15, took


# ------------------------------------------------------------------ a script that fails at once
def test_script_failing_in_its_first_second_exits_promptly(tmp_path):
    s = script(tmp_path, "typo.py", """
        import vinehpc as vine
        m = vine.Manager()
        m.submit(vine.Task("echo hi"))
        undefined_name
    """)
    code, out, took = run([sys.executable, "-m", "vinehpc", "run", "-n", "4", s], tmp_path)
    assert code == 1, out
    assert "NameError" in out
    assert "handshake" not in out and "lost the manager" not in out, out
    assert took < 6, "took %.1f s" % took


# ------------------------------------------------------------------ a normal end is quiet
def test_normal_end_with_tasks_still_running_prints_no_lost_manager(tmp_path):
    s = script(tmp_path, "early.py", """
        import vinehpc as vine
        m = vine.Manager()
        for i in range(200):
            m.submit(vine.Task("sleep 0.05; echo %d" % i))
        m.wait(10)
        print("ok")
    """)
    for _ in range(3):      # the reset was a race: give it several chances
        code, out, took = run([sys.executable, "-m", "vinehpc", "run", "-n", "4", s], tmp_path)
        assert code == 0, out
        # what vinehpc run itself says (its run directory, the summary), and nothing from workers
        assert [l for l in out.splitlines() if not l.startswith(("vinehpc run: run directory", "vinehpc: "))] \
            == ["ok"], out


# ------------------------------------------------------------------ workers that cannot join
def test_worker_with_a_wrong_secret_exits_with_the_reason(tmp_path):
    port = free_port()
    s = script(tmp_path, "mgr.py", """
        import sys, time, vinehpc as vine
        m = vine.Manager(%d, secret="right-secret-0123456789", run_dir=sys.argv[1])
        print("listening", flush=True)
        time.sleep(30)
    """ % port)
    mgr = subprocess.Popen([sys.executable, s, str(tmp_path / "run")], cwd=tmp_path, env=_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert mgr.stdout.readline().strip() == "listening"
        code, out, took = run([sys.executable, "-m", "vinehpc", "worker", "127.0.0.1:%d" % port], tmp_path,
                              timeout=30, VINEHPC_SECRET="wrong-secret-0123456789")
    finally:
        mgr.kill()
        mgr.wait(10)
    assert code == 2, out
    assert "secret is wrong" in out, out
    assert took < 10, took


def test_worker_to_a_closed_port_says_refused_at_once_and_gives_up(tmp_path):
    port = free_port()
    w = subprocess.Popen([sys.executable, "-m", "vinehpc", "worker", "127.0.0.1:%d" % port, "--connect-timeout",
                          "4"], cwd=tmp_path, env=_env(VINEHPC_SECRET="s" * 24), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        t0 = time.monotonic()
        first = w.stdout.readline()
        said = time.monotonic() - t0
        rest, _ = w.communicate(timeout=30)
    finally:
        if w.poll() is None:
            w.kill()
    assert "refused" in first, first
    assert said < 3, said                 # not after the whole timeout
    assert w.returncode == 1
    assert "refused" in rest and "within 4 s" in rest, rest
    assert rest.count("retrying") == 0    # the reason is said once


def test_worker_to_an_unknown_host_says_cannot_resolve(tmp_path):
    code, out, took = run([sys.executable, "-m", "vinehpc", "worker", "no-such-host.invalid:9123",
                           "--connect-timeout", "2"], tmp_path, VINEHPC_SECRET="s" * 24)
    assert code == 1
    assert "cannot resolve" in out, out
    assert out.count("cannot resolve") == 2, out     # once when it starts retrying, once when it gives up


# ------------------------------------------------------------------ outputs into folders
@pytest.fixture
def local_manager(tmp_path):
    import vinehpc
    m = vinehpc.Manager(local_workers=1, run_dir=str(tmp_path / "run"))
    yield m
    m.close()


def test_small_output_into_a_folder_that_does_not_exist_is_written(local_manager, tmp_path):
    import vinehpc
    m = local_manager
    small = tmp_path / "new" / "deeper" / "small.txt"
    big = tmp_path / "other" / "big.bin"
    t = vinehpc.Task("echo hello > small.txt; head -c 5000000 /dev/zero > big.bin")
    t.add_output(m.declare_file(str(small)), "small.txt")
    t.add_output(m.declare_file(str(big)), "big.bin")
    m.submit(t)
    assert m.wait(30) is t
    assert t.successful(), (t.result, t.reason)
    assert small.read_text() == "hello\n"
    assert big.stat().st_size == 5000000


def test_output_the_manager_cannot_write_is_its_failure_with_every_error_kept(local_manager, tmp_path):
    import vinehpc
    m = local_manager
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    t = vinehpc.Task("echo one > one.txt; echo two > two.txt")
    t.add_output(m.declare_file(str(blocker / "one.txt")), "one.txt")
    t.add_output(m.declare_file(str(blocker / "sub" / "two.txt")), "two.txt")
    m.submit(t)
    assert m.wait(30) is t
    assert t.result == vinehpc.VINE_RESULT_OUTPUT_TRANSFER_ERROR, (t.result, t.reason)
    assert t.exit_code == 0
    assert "the manager could not write 2 outputs" in t.reason, t.reason
    assert "one.txt" in t.reason and "two.txt" in t.reason, t.reason


# ------------------------------------------------------------------ what a run says about itself
def test_resumed_run_says_how_many_tasks_it_resumed_and_from_where(tmp_path):
    s = script(tmp_path, "res.py", """
        import sys, vinehpc as vine
        m = vine.Manager(local_workers=1, run_dir=sys.argv[1], resume=True)
        for i in range(4):
            m.submit(vine.Task("echo %d" % i))
        while not m.empty():
            m.wait(10)
        m.close()
    """)
    run_dir = str(tmp_path / "run")
    code, out, _ = run([sys.executable, s, run_dir], tmp_path)
    assert code == 0 and "resumed" not in out, out
    code, out, _ = run([sys.executable, s, run_dir], tmp_path)
    assert code == 0, out
    assert "4/4 tasks resumed from %s (remove it to start afresh)" % run_dir in out, out


def test_vinehpc_run_prints_its_run_dir_links_latest_and_ends_with_a_summary(tmp_path):
    s = script(tmp_path, "two.py", """
        import vinehpc as vine
        m = vine.Manager()
        for i in range(3):
            m.submit(vine.Task("echo %d" % i))
        while not m.empty():
            m.wait(10)
    """)
    for _ in range(2):
        code, out, _ = run([sys.executable, "-m", "vinehpc", "run", "-n", "1", s], tmp_path,
                           VINEHPC_RUN_DIR=str(tmp_path / "runs"))
        assert code == 0, out
    dirs = sorted(d for d in os.listdir(tmp_path / "runs") if not d.startswith(("latest", ".")))
    assert len(dirs) == 2
    newest = os.path.join(str(tmp_path / "runs"), os.readlink(tmp_path / "runs" / "latest"))
    assert "vinehpc run: run directory %s" % newest in out, out
    assert os.path.samefile(newest, tmp_path / "runs" / max(dirs, key=lambda d: os.stat(tmp_path / "runs" / d).st_mtime))
    last = out.strip().splitlines()[-1]
    assert last.startswith("vinehpc: 3 done, 0 failed in ") and "tasks/s" in last and newest in last, out


def test_progress_off_a_terminal_is_a_line_every_interval(tmp_path):
    s = script(tmp_path, "slow.py", """
        import vinehpc as vine
        m = vine.Manager()
        for i in range(12):
            m.submit(vine.Task("sleep 0.3"))
        while not m.empty():
            m.wait(10)
    """)
    code, out, took = run([sys.executable, "-m", "vinehpc", "run", "-n", "2", s], tmp_path,
                          VINEHPC_PROGRESS_INTERVAL="1")
    assert code == 0, out
    lines = [l for l in out.splitlines() if " elapsed" in l]
    assert 1 <= len(lines) <= took + 1, out         # one a second here (a minute by default), not redrawn
    assert "\r" not in out and "\033[K" not in out
    assert any("ETA " in l for l in lines), out
    code, out, _ = run([sys.executable, "-m", "vinehpc", "run", "-n", "2", "--progress", "never", s], tmp_path,
                       VINEHPC_PROGRESS_INTERVAL="1")
    assert " elapsed" not in out, out


def test_bare_vinehpc_lists_the_commands(tmp_path):
    code, out, _ = run([sys.executable, "-m", "vinehpc"], tmp_path)
    assert code == 0, out
    for c in ("run", "pilot", "worker", "logs", "sysimage", "audit"):
        assert "\n    %s " % c in out, out


@pytest.mark.parametrize("cmd, options", [("run", ["--cores-per-worker"]),
                                          ("worker", ["--cores", "--gpus", "-v, --verbose", "--log-dir"])])
def test_options_have_help(tmp_path, cmd, options):
    import argparse
    from vinehpc.cli import parser
    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[cmd]
    for a in sub._actions:
        if set(a.option_strings) & {o.split(",")[0] for o in options}:
            assert a.help, "%s %s has no help" % (cmd, a.option_strings)


def test_the_first_hour_api_has_docstrings():
    import vinehpc
    for obj in (vinehpc.Task.set_cores, vinehpc.Task.set_category, vinehpc.Task.set_env_var, vinehpc.Task.set_gpus,
                vinehpc.Task.set_tag, vinehpc.PythonTask.output, vinehpc.PythonTask.exception,
                vinehpc.Executor.submit):
        assert (obj.__doc__ or "").strip(), obj


# ------------------------------------------------------------------ the image launcher's own cost
@pytest.fixture(scope="module")
def six_image(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    out = str(d / "six.vimg")
    code, text, _ = run([sys.executable, "-m", "vinehpc", "sysimage", "python", "--packages", "six", "-o", out], d,
                        timeout=240)
    assert code == 0, text
    return out


def _shared_ops(tmp_path, name, cmd):
    """`vinehpc audit` of cmd, with the project and the Python installation counted as shared
    filesystems (as on a cluster, where both live on one): (shared ops, the report)."""
    import json
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    rep = str(tmp_path / (name + ".json"))
    code, out, _ = run([sys.executable, "-m", "vinehpc", "audit", "--json", "-o", rep, "--shared", ROOT,
                        "--shared", sys.base_prefix, "--"] + cmd, tmp_path, timeout=120)
    assert code == 0, out
    r = json.load(open(rep))
    return r["shared"]["ops"], r


def test_cheap_image_launcher_is_nearly_free_of_shared_filesystem_traffic(tmp_path, six_image):
    local = str(tmp_path / "local")
    launcher = os.path.join(ROOT, "sysimage_tools", "launch.py")
    code, out, _ = run([sys.executable, "-S", launcher, six_image, "--local-dir", local, "--", sys.executable, "-c",
                        "import six; print('six', six.__version__)"], tmp_path)
    assert code == 0 and out.startswith("six "), out          # the first unpack on this "node" works under -S
    cli, _ = _shared_ops(tmp_path, "cli", [sys.executable, "-m", "vinehpc", "sysimage", "run", "--local-dir", local,
                                           six_image, "--", "true"])
    cheap, rep = _shared_ops(tmp_path, "cheap", [sys.executable, "-S", launcher, six_image, "--local-dir", local,
                                                 "--", "true"])
    bare, _ = _shared_ops(tmp_path, "bare", [sys.executable, "-S", "-c", "pass"])
    print("shared ops: vinehpc sysimage run %d, launch.py %d, bare python -S %d" % (cli, cheap, bare))
    assert cheap * 3 < cli, (cheap, cli)
    assert not [p for p in rep["top_shared_paths"] if p["path"].endswith("messages.mo")]   # no gettext probing
    assert not [p for p in rep["top_shared_paths"] if "site-packages" in p["path"]]


def test_audit_advice_points_at_the_cheap_launcher():
    from sysimage_tools.audit.report import REMEDY
    assert "python3 -S %s IMAGE -- CMD" % os.path.join(ROOT, "sysimage_tools", "launch.py") in REMEDY
