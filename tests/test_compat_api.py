"""TaskVine compatibility (issue 12, items 1-4): the constructor, arguments by value, results,
and the Manager/Task/File methods TaskVine scripts call.  Unit tests first, then real
managers with real workers (tests/taskvine_scripts/ runs the same in TaskVine's style)."""
from __future__ import annotations

import io
import logging
import socket
import subprocess
import sys
import tarfile
import warnings

import cloudpickle
import pytest

import vinehpc
from vinehpc import PythonTask, PythonTaskNoResult, Task, TaskError
from vinehpc import _context, status_client
from vinehpc.file import Buffer, File, Temp
from vinehpc.manager import _ports
from conftest import poll, read_journal, wait_all, worker_cmd


# ---------------------------------------------------------------- Task(command, **task_info)
def test_task_info_keys_call_the_setters(tmp_path):
    f, out = Buffer(b"x"), File(str(tmp_path / "o"))
    t = Task("cat in", cores=2, memory=100, disk=50, gpus=0, tag="t1", category="c", retries=3, time_max=5,
             env={"A": "1"}, inputs={f: "in"}, outputs={out: {"remote_name": "o", "watch": True}})
    assert t.resources == {"cores": 2, "memory": 100, "disk": 50, "gpus": 0}
    assert (t.tag, t.category, t.retries, t.time_max, t.env) == ("t1", "c", 3, 5.0, {"A": "1"})
    assert t.inputs == [(f, "in")] and t.outputs == [(out, "o")] and t.watched == ["o"]


def test_task_info_refuses_what_it_does_not_do():
    with pytest.raises(NotImplementedError, match="priority"):
        Task("true", priority=3)
    with pytest.raises(TypeError, match="colour"):
        Task("true", colour="blue")
    with pytest.raises(TypeError, match="did you mean"):
        Task({"cores": 1})


def test_set_env_var_none_drops_it_and_output_is_std_output():
    t = Task("true").set_env_var("A", "1").set_env_var("A", None)
    assert t.env == {}
    t.std_output = "hi\n"
    assert t.output == "hi\n" and t.result_string is None


def test_add_output_failure_only_is_refused():
    with pytest.raises(NotImplementedError, match="failure_only"):
        Task("true").add_output(Temp(), "o", failure_only=True)


def test_completed_and_successful_follow_taskvine():
    t = Task("exit 3")
    t.result, t.exit_code = "success", 3
    assert t.completed() and not t.successful()
    t.exit_code = 0
    assert t.successful()
    t.result = "cancelled"
    assert not t.completed() and not t.successful()


# ---------------------------------------------------------------- results of a PythonTask
def test_output_is_the_exception_or_no_result():
    t = PythonTask(int, "x")
    t.result, t.reason = "cancelled", "cancelled by the user"
    assert isinstance(t.output, PythonTaskNoResult) and isinstance(t.output, TaskError)
    assert "cancelled by the user" in str(t.output)
    assert t.exception is t.output
    with pytest.raises(PythonTaskNoResult):
        t.output_or_raise()


# ---------------------------------------------------------------- arguments travel by value
def test_arguments_are_pickled_by_value_for_script_classes():
    main = sys.modules["__main__"]
    ns = {"__name__": "__main__"}
    exec("class PointForCompatTest:\n    def __init__(self, x):\n        self.x = x\n", ns)
    cls = ns["PointForCompatTest"]
    main.PointForCompatTest = cls        # as in a script: plain pickle would succeed *by reference*
    try:
        t = PythonTask(lambda p: p.x, cls(4))
        t._check()
    finally:
        del main.PointForCompatTest
    # unpickled where __main__ has no such class (a worker): still loads
    code = "import pickle, sys; args, kw = pickle.loads(sys.stdin.buffer.read()); print(args[0].x)"
    r = subprocess.run([sys.executable, "-c", code], input=t._abytes, stdout=subprocess.PIPE, timeout=60)
    assert r.stdout.strip() == b"4", r


def test_plain_arguments_take_plain_pickle():
    import pickle
    t = PythonTask(pow, 2, 10)
    t._check()
    assert t._abytes == pickle.dumps(((2, 10), {}), protocol=pickle.HIGHEST_PROTOCOL)


# ---------------------------------------------------------------- the constructor
def test_ports():
    assert _ports(None) == [0] and _ports(9123) == [9123] and _ports((9123, 9125)) == [9123, 9124, 9125]
    for bad in (-1, 70000, True, "9123", (5, 2), (0, 3)):
        with pytest.raises(ValueError):
            _ports(bad)


def test_taskvine_constructor_arguments(tmp_path, caplog):
    seen = []
    with caplog.at_level(logging.WARNING, logger="vinehpc.manager"):
        m = vinehpc.Manager(0, "proj", True, str(tmp_path / "info"), "this-run", str(tmp_path / "stage"), True,
                            seen.append, None)      # newer TaskVine's order: run_info_template 5th
    try:
        assert seen == [m] and m.name == "proj" and m.using_ssl is True     # ssl=True: TLS (tests/test_tls.py)
        assert m.run_dir == str(tmp_path / "info" / "this-run")
        assert m.staging_directory == str(tmp_path / "stage" / "vine-staging")
        assert "(TLS)" in caplog.text and m.tls_fingerprint in caplog.text
        m.set_name("other")
        assert m.stats["name"] == "other"
        # what `vinehpc status` shows, asked over the manager's port as the command does
        snap = status_client.snapshot("127.0.0.1:%d" % m.port, m.secret, None, fingerprint=m.tls_fingerprint)
        assert snap["name"] == "other", snap
    finally:
        m.close()
    names = [r.get("name") for r in read_journal(m) if r.get("event") in ("manager started", "name")]
    assert names == ["proj", "other"]


def test_a_port_range_takes_the_first_free_port(tmp_path):
    busy = socket.create_server(("127.0.0.1", 0))
    p = busy.getsockname()[1]
    try:
        m = vinehpc.Manager((p, p + 20), host="127.0.0.1", run_dir=str(tmp_path / "r"))
        try:
            assert p < m.port <= p + 20
        finally:
            m.close()
    finally:
        busy.close()


def _free_port():
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


@pytest.fixture
def local_run(tmp_path, monkeypatch):
    """The context of `vinehpc run -n 2` (launcher.local.LocalRun), as a script sees it."""
    from launcher.local import LocalRun
    from vinehpc.config import Settings
    monkeypatch.chdir(tmp_path)
    ctx = LocalRun(2, 1, Settings.from_env())
    prev = _context.set_current(ctx)
    yield ctx
    try:
        ctx.shutdown()
    finally:
        _context.set_current(prev)


@pytest.mark.timeout(90)
def test_manager_with_a_port_under_a_run_gets_the_runs_workers_and_listens_there(local_run):
    port = _free_port()
    m = vinehpc.Manager(port)
    assert m.port == port
    assert m.wait_for_workers(2, timeout=30) == 2            # the run's workers
    extra = subprocess.Popen(worker_cmd(m), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert m.wait_for_workers(3, timeout=30) == 3        # and one more on the port it asked for
        m.submit(PythonTask(pow, 3, 2))
        assert m.wait(30).output == 9
    finally:
        m.close()
        extra.wait(timeout=30)


@pytest.mark.timeout(90)
def test_a_busy_port_under_a_run_is_a_warning_not_an_error(local_run, caplog):
    busy = socket.create_server(("0.0.0.0", 0))
    try:
        with caplog.at_level(logging.WARNING, logger="vinehpc.manager"):
            m = vinehpc.Manager(port=busy.getsockname()[1])
        try:
            assert "cannot also listen" in caplog.text
            m.submit(Task("true"))
            assert m.wait(30).successful()
        finally:
            m.close()
    finally:
        busy.close()


# ---------------------------------------------------------------- manager methods, real workers
def test_wait_with_nothing_outstanding_returns_at_once(manager):
    assert manager.wait() is None and manager.wait("wait_forever") is None and manager.wait(-1) is None
    assert manager.wait_for_tag("x") is None and manager.wait_for_task_id(12345) is None


def test_tune_and_set_scheduler_refuse_what_they_do_not_know(manager):
    m = manager
    with pytest.raises(ValueError, match="unknown tune"):
        m.tune("no-such-knob", 1)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert m.tune("hungry-minimum", 2) == -1
    assert "hungry-minimum" in str(w[0].message)
    assert m.tune("keepalive-interval", 30) == 0 and m._server.ka_interval == 30.0
    with pytest.raises(ValueError, match="fcfs"):
        m.set_scheduler("worst")
    m.set_scheduler(1)
    assert type(m.core.policy).__name__ == "FCFS"
    with pytest.raises(NotImplementedError, match="sysimage"):
        m.declare_poncho("env.tar.gz")
    with pytest.raises(NotImplementedError, match="sysimage"):
        m.declare_starch("env.sfx")


@pytest.mark.timeout(60)
def test_executable_buffer_and_url_inputs(manager, tmp_path):
    m = manager
    src = tmp_path / "tool.sh"
    src.write_text("#!/bin/sh\necho from-url\n")
    src.chmod(0o644)                          # not executable here: TaskVine makes URL files executable
    a = Task("./a.sh && ./b.sh")
    a.add_input(m.declare_buffer("#!/bin/sh\necho from-buffer\n"), "a.sh")
    a.add_input(m.declare_url(src.as_uri()), "b.sh")
    m.submit(a)
    wait_all(m, 1, timeout=30)
    assert a.successful(), (a.result, a.reason, a.std_output)
    assert a.std_output.split() == ["from-buffer", "from-url"]


@pytest.mark.timeout(60)
def test_declare_untar_and_its_guard(manager, tmp_path):
    m = manager

    def tarball(name, member):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            info = tarfile.TarInfo(member)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"ok"))
        return m.declare_buffer(buf.getvalue())

    d = m.declare_untar(tarball("good", "sub/x.txt"))
    t = Task("cat d/sub/x.txt")
    t.add_input(d, "d")
    m.submit(t)
    wait_all(m, 1, timeout=30)
    assert t.successful() and t.std_output == "ok", (t.result, t.reason, t.std_output)
    with pytest.raises(tarfile.TarError):
        m.declare_untar(tarball("evil", "../escape.txt"))
    assert not (tmp_path / "escape.txt").exists()


@pytest.mark.timeout(60)
def test_undeclare_file_drops_worker_copies(manager):
    m = manager
    f = m.declare_buffer(b"cached", cache=True)
    t1 = Task("cat f").add_input(f, "f")
    m.submit(t1)
    wait_all(m, 1, timeout=30)
    cached = sum(w["cached"] for w in m.workers())
    assert m.get_file_replica_count(f) == 1 and m.get_file_replica_count(m.declare_buffer(b"never sent")) == 0
    m.prune_file(f)             # TaskVine's name for it
    assert sum(w["cached"] for w in m.workers()) == cached - 1
    assert m.get_file_replica_count(f) == 0
    poll(lambda: read_journal(m, "undeclared"), 10, "the undeclare in the journal", m=m)
    assert [r["file"] for r in read_journal(m, "undeclared")] == [f.cachename()]
    t2 = Task("cat f").add_input(f, "f")       # needed again: sent again
    m.submit(t2)
    wait_all(m, 1, timeout=30)
    assert t2.successful() and t2.std_output == "cached"


@pytest.mark.timeout(60)
def test_cancelled_python_task_output_is_no_result(manager):
    m = manager
    t = PythonTask(__import__("time").sleep, 30)
    m.submit(t)
    assert m.cancel_by_task_id(t.id) == 1
    assert m.wait_for_task_id(t.id, 30) is t and t.result == "cancelled"
    assert isinstance(t.output, PythonTaskNoResult)
    assert m.cancel_by_task_id(t.id) == 0


@pytest.mark.timeout(60)
def test_a_watched_output_grows_at_the_manager_while_the_task_runs(manager, tmp_path):
    m = manager
    log_file = tmp_path / "progress.log"
    go = tmp_path / "go"           # the task ends once the test has seen its first line arrive
    t = Task("echo first > log.txt; while [ ! -e %s ]; do sleep 0.05; done; echo second >> log.txt" % go)
    t.add_output(m.declare_file(log_file), "log.txt", watch=True)
    m.submit(t)
    poll(lambda: log_file.exists() and log_file.read_text() == "first\n", 20, "the first line to stream back", m=m)
    assert m.wait(0) is None                              # still running
    go.touch()
    wait_all(m, 1, timeout=30)
    assert t.successful(), (t.result, t.reason)
    assert log_file.read_text() == "first\nsecond\n"      # the final copy replaces the streamed one


@pytest.mark.timeout(60)
def test_a_watched_task_outlives_the_keepalive_timeout(make_manager, tmp_path):
    # the worker sends the watched output every second, so the manager (which pings only a
    # silent worker) sends nothing while the task runs: the worker must ask rather than
    # conclude after keepalive_timeout that the manager is gone (TaskVine's watch example
    # runs 30 s tasks; the default timeout is 30 s).  The interval is above the watch's
    # once-a-second stream, as the default 5 s is.
    m = make_manager(local_workers=1, keepalive_interval=1.5, keepalive_timeout=3)
    m.wait_for_workers(1, timeout=30)
    log_file = tmp_path / "ticks.log"
    t = Task("for i in $(seq 10); do echo $i >> log.txt; sleep 0.5; done")
    t.add_output(m.declare_file(log_file), "log.txt", watch=True)
    m.submit(t)
    wait_all(m, 1, timeout=20)
    assert t.successful(), (t.result, t.reason)
    assert log_file.read_text() == "".join("%d\n" % i for i in range(1, 11))
    assert not [e for e in read_journal(m) if e["event"] == "worker lost"]


@pytest.mark.timeout(60)
def test_a_local_factory_starts_workers_for_a_manager_alone_and_stops_them(make_manager):
    m = make_manager(port=0, host="127.0.0.1")
    f = vinehpc.Factory(manager=m)
    f.cores, f.min_workers, f.max_workers = 2, 1, 1
    with f:
        m.wait_for_workers(1, timeout=30)
        t = Task("echo hi")
        m.submit(t)
        assert m.wait(30) is t and t.std_output == "hi\n"
        assert [w["resources"]["cores"] for w in m.workers()] == [2]
    poll(lambda: not m.workers(), 20, "the factory's worker to leave", m=m)
    with pytest.raises(NotImplementedError, match="launchers"):
        vinehpc.Factory("condor", manager=m).start()
    with pytest.raises(AttributeError, match="not a Factory option"):
        f.colour = "blue"


def test_a_library_installed_next_to_the_script_is_not_pickled_by_value(tmp_path, monkeypatch):
    # `pip install --target ./lib` puts a library (and its *.dist-info) under the script's
    # directory: its modules are installed ones, not the user's helpers (pickling awkward by
    # value recursed without end); a helper module next to the script still travels by value
    from vinehpc import task as task_mod
    (tmp_path / "lib" / "tvexlib").mkdir(parents=True)
    (tmp_path / "lib" / "tvexlib" / "__init__.py").write_text("class Thing:\n    pass\n")
    (tmp_path / "lib" / "tvexlib-1.0.dist-info").mkdir()
    (tmp_path / "tvexhelper.py").write_text("class Helper:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("tvexlib", "tvexhelper"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(task_mod, "_by_value_roots", [])
    monkeypatch.setattr(task_mod, "_by_value_names", [])
    registered = []
    monkeypatch.setattr(task_mod.cloudpickle, "register_pickle_by_value", lambda mod: registered.append(mod.__name__))
    task_mod.pickle_by_value_under(str(tmp_path))
    import tvexhelper
    import tvexlib
    task_mod._register_by_value(tvexlib.Thing)
    task_mod._register_by_value(tvexhelper.Helper)
    assert registered == ["tvexhelper"]


def test_only_a_manager_file_can_be_watched():
    with pytest.raises(ValueError, match="watched"):
        Task("true").add_output(Temp(), "o", watch=True)


def test_taskvine_names_for_existing_settings(manager):
    m = manager
    assert m.set_keepalive_timeout(90) == 0 and m._server.ka_timeout == 90.0
    assert m.enable_monitoring() == 1
    m.set_category_resources_max("big", {"memory": 100})
    assert m._call(lambda: m.core.category("big").max["memory"]) == 100.0
    m.enable_disconnect_slow_workers_category("big", 3)
    m.block_host_with_timeout("no-such-host", 5)
    m.log_txn_app("hello from the app")
    assert m.logging_directory == m.run_dir
    poll(lambda: read_journal(m, "application"), 10, "the application's line in the journal", m=m)
    assert read_journal(m, "application")[0]["entry"] == "hello from the app"


def test_manager_takes_taskvines_positional_arguments_in_its_order():
    import inspect
    names = list(inspect.signature(vinehpc.Manager.__init__).parameters)[1:10]
    assert names == ["port", "name", "shutdown", "run_info_path", "run_info_template", "staging_path", "ssl",
                     "init_fn", "status_display_interval"]
    with pytest.raises(ValueError, match="pass it by keyword .staging_path"):   # older TaskVine's order
        vinehpc.Manager(0, "x", False, "/tmp/info", "/scratch/stage")


def test_file_contents_len_and_truth(tmp_path):
    p = tmp_path / "empty"
    p.write_bytes(b"")
    f = File(str(p))
    assert len(f) == 0 and bool(f) and f.contents() == b""
    b = Buffer(b"abc")
    assert len(b) == 3 and b.contents() == b"abc"
    p.write_bytes(cloudpickle.dumps({"k": 1}))      # TaskVine's contents(unserializer), e.g. cloudpickle.load
    assert f.contents(cloudpickle.load) == {"k": 1} and f.contents(lambda fh: fh.read(1)) == b"\x80"
    assert b.contents(lambda fh: fh.read().upper()) == b"ABC"
    assert len(Temp()) == 0
    with pytest.raises(ValueError, match="fetch_file"):
        Temp().contents()


@pytest.mark.timeout(90)
def test_wait_for_workers_holds_dispatch_until_enough_joined(manager):
    m = manager                                   # 2 workers connected
    assert m.tune("wait-for-workers", 3) == 0
    t = Task("true", scheduler=vinehpc.VINE_SCHEDULE_FILES)
    m.submit(t)
    assert m.wait(1.0) is None and m.stats["running"] == 0
    extra = subprocess.Popen(worker_cmd(m), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert m.wait(30) is t and t.successful()
    finally:
        m.close()
        extra.wait(timeout=30)


def test_taskvine_constants():
    assert vinehpc.VINE_RESULT_SUCCESS == "success" and vinehpc.VINE_DEFAULT_PORT == 9123
    Task("true").set_scheduler(vinehpc.VINE_SCHEDULE_FCFS).set_scheduler("files")
    with pytest.raises(ValueError):
        Task("true").set_scheduler(5)


@pytest.mark.timeout(60)
def test_hungry_counts_down_as_tasks_wait(manager):
    m = manager                                   # 2 workers x 1 core: TaskVine's minimum of 10 applies
    assert m.hungry() == 10
    assert m.tune("wait-for-workers", 3) == 0     # nothing dispatched: what is submitted waits
    for _ in range(4):
        m.submit(Task("true"))
    assert m.hungry() == 6
    assert m.tune("wait-for-workers", 0) == 0
    wait_all(m, 4, timeout=30)
    assert m.hungry() == 10


@pytest.mark.timeout(60)
def test_declare_untar_of_a_temp_unpacks_it_on_the_worker(manager):
    m = manager
    tarball = m.declare_temp()
    make = Task("mkdir d && echo inside > d/f.txt && tar -czf t.tgz -C d .")
    make.add_output(tarball, "t.tgz")
    m.submit(make)
    d = m.declare_untar(tarball)
    use = Task("cat dir/f.txt").add_input(d, "dir")
    m.submit(use)
    got = wait_all(m, 2, timeout=30)               # the unpacking task is not returned by wait()
    assert set(got) == {make.id, use.id}
    assert use.successful() and use.std_output == "inside\n", (use.result, use.reason, use.std_output)


@pytest.mark.timeout(60)
def test_declare_minitask_makes_a_temp(manager):
    m = manager
    f = m.declare_minitask(Task("echo made > out.txt"), "out.txt")
    use = Task("cat in.txt").add_input(f, "in.txt")
    m.submit(use)
    wait_all(m, 1, timeout=30)
    assert use.successful() and use.std_output == "made\n", (use.result, use.reason)
    assert m.fetch_file(f) == "made\n"


def test_a_silent_task_that_ran_has_empty_std_output(manager):
    # TaskVine: "" for a task that ran and printed nothing (scripts do `t.std_output.strip()`);
    # None only for one that never ran
    t = Task("true")
    manager.submit(t)
    done = manager.wait(30)
    assert done is t and t.successful() and t.std_output == ""
    assert Task("true").std_output is None
