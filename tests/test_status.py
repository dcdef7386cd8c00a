"""`vinehpc status`, m.stats and the metrics endpoint on a real run (a few hundred tasks with a
failure, a retry and a worker killed with SIGKILL), and from the run directory alone afterwards."""
from __future__ import annotations

import json
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client import parser as prom_parser

import vinehpc
from vinehpc.protocol import auth, handshake, messages
from vinehpc.status import Stats, Tracker, final_snapshot, replay

from conftest import diagnose, poll, read_journal, wait_all, worker_cmd


N_SHORT = 300


def status(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "vinehpc", "status", *args], capture_output=True, text=True,
                          timeout=timeout)


def status_json(*args):
    r = status(*args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def consistent(c):
    """The figures add up, whatever moment they were taken at."""
    assert c["tasks_done"] + c["tasks_running"] + c["tasks_waiting"] == c["tasks_submitted"], c
    assert c["tasks_succeeded"] + c["tasks_failed"] == c["tasks_done"], c
    assert c["workers_busy"] + c["workers_idle"] == c["workers_connected"], c
    assert 0 <= c["committed_cores"] <= c["total_cores"], c


def metrics(port) -> dict:
    """{(name, labels...): value} of one scrape, parsed by prometheus_client's own parser."""
    text = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=10).read().decode()
    out = {}
    for fam in prom_parser.text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name,) + tuple(sorted(s.labels.items()))] = s.value
    return out


def watch_on_a_pty(args, timeout=60) -> tuple:
    """Run `vinehpc status ... --watch` with a terminal as its output: (exit code, bytes shown)."""
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "vinehpc", "status", *args], stdin=slave, stdout=slave,
                         stderr=slave, close_fds=True)
    os.close(slave)
    got = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            r, _, _ = select.select([master], [], [], 1.0)
            if r:
                try:
                    data = os.read(master, 65536)
                except OSError:       # EIO: the other side of the pty is closed (the command exited)
                    break
                if not data:
                    break
                got += data
            elif p.poll() is not None:
                break
        return p.wait(timeout=max(1.0, deadline - time.monotonic())), got
    finally:
        os.close(master)
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.timeout(240)
def test_status_of_a_real_run(tmp_path):
    gate, marker = tmp_path / "gate", tmp_path / "flaky-ran-once"
    m = vinehpc.Manager(port=0, host="127.0.0.1", run_dir=str(tmp_path / "run"), metrics_port=0)
    workers = [subprocess.Popen(worker_cmd(m), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for _ in range(3)]
    try:
        m.wait_for_workers(3, timeout=60)
        # every worker busy with a task that waits for the gate: the others queue behind them
        for i in range(3):
            t = vinehpc.Task("while [ ! -e %s ]; do sleep 0.05; done" % gate)
            t.set_category("gate")
            m.submit(t)
        for i in range(N_SHORT):
            t = vinehpc.Task("true")
            t.set_category("short")
            t.set_tag("batch-%d" % (i % 2))
            m.submit(t)
        bad = vinehpc.Task("exit 3")
        bad.set_category("bad")
        m.submit(bad)
        flaky = vinehpc.Task("test -e {0} || {{ touch {0}; exit 1; }}".format(marker))
        flaky.set_category("flaky")
        flaky.set_retries(2)
        m.submit(flaky)
        total = 3 + N_SHORT + 2
        poll(lambda: m.stats.tasks_running >= 3 and m.stats.tasks_submitted == total, 60, "the gate tasks to run", m=m)

        # ---- m.stats: TaskVine's names as attributes and keys, the older keys too
        s = m.stats
        assert isinstance(s, Stats) and s.tasks_submitted == s["tasks_submitted"] == s["submitted"] == total
        assert s.workers_connected == s["workers"] == 3 and s.workers_busy == 3
        consistent(s)

        # ---- vinehpc status --json while tasks run (from the run directory: its secret, its address)
        snap = status_json(m.run_dir)
        c = snap["counts"]
        consistent(c)
        assert snap["source"] == "manager" and not snap["ended"]
        assert c["tasks_submitted"] == total and c["tasks_running"] >= 3 and c["workers_connected"] == 3
        assert snap["oldest_running"]["category"] == "gate" and snap["oldest_running"]["host"]
        assert snap["nodes"][0]["workers"] == 3 and snap["nodes"][0]["busy_cores"] == 3
        assert snap["categories"]["short"]["submitted"] == N_SHORT
        assert snap["tags"]["batch-0"]["submitted"] == N_SHORT // 2
        # the same through HOST:PORT and the secret file
        assert status_json("127.0.0.1:%d" % m.port, "--secret-file", m.secret_file)["counts"]["tasks_submitted"] == total

        # ---- the metrics endpoint, read with a real HTTP client while tasks run
        got = poll(lambda: (lambda g: g if g.get(("vinehpc_category_tasks", ("category", "gate"), ("state", "running")))
                            == 3 else None)(metrics(m.metrics_port)), 30, "metrics with the gate tasks running", m=m)
        assert got[("vinehpc_tasks_submitted_total",)] == total
        assert got[("vinehpc_workers_connected",)] == 3
        assert got[("vinehpc_node_workers", ("host", snap["nodes"][0]["host"]))] == 3
        assert got[("vinehpc_tasks_waiting",)] + got[("vinehpc_tasks_running",)] + got[("vinehpc_tasks_done_total",)] \
            == total

        # ---- --watch on a terminal redraws in place, and stops after --count views
        rc, shown = watch_on_a_pty([m.run_dir, "--watch", "--interval", "0.2", "--count", "3"])
        assert rc == 0, shown
        assert shown.count(b"\x1b[H\x1b[2J") == 3 and b"\x1b[?25l" in shown and b"\x1b[?25h" in shown, shown
        assert b"tasks" in shown and b"gate" in shown
        # ... and is plain repeated output when not on a terminal
        r = status(m.run_dir, "--watch", "--interval", "0.1", "--count", "2")
        assert r.returncode == 0 and "\x1b[" not in r.stdout and r.stdout.count("vinehpc status") == 2, r

        # ---- a wrong secret: refused, and not one figure said
        wrong = tmp_path / "wrong-secret"
        auth.write_secret(str(wrong), "not-the-secret")
        r = status("127.0.0.1:%d" % m.port, "--secret-file", str(wrong), "--json")
        assert r.returncode == 3 and r.stdout == "" and "refused" in r.stderr, r
        assert "tasks" not in r.stderr and str(total) not in r.stderr
        assert_refused_on_the_wire(m, "not-the-secret")

        # ---- a worker killed: lost, its task requeued, and why
        workers[0].send_signal(signal.SIGKILL)
        poll(lambda: m.stats.workers_lost == 1, 60, "the killed worker to be noticed", m=m)
        s = m.stats
        assert s.workers_connected == 2 and s.tasks_retried >= 1
        consistent(s)
        snap = status_json(m.run_dir)
        assert snap["workers_lost"][0]["tasks"] >= 1 and snap["lost_reasons"]
        consistent(snap["counts"])

        gate.touch()
        got = wait_all(m, total, timeout=120)
        assert len(got) == total and bad.exit_code == 3 and flaky.successful()
        s = m.stats
        assert s.tasks_done == s.tasks_submitted == total and s.tasks_waiting == 0 and s.tasks_running == 0
        assert s.tasks_failed == 1 and s.failed == 1 and s.done == total - 1
        assert s.tasks_retried >= 2 and s.workers_lost == 1
    except BaseException:
        print(diagnose(m, "test_status failed"))
        raise
    finally:
        m.close()
        for w in workers:
            try:
                w.wait(timeout=30)
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait()

    # ---- after the run, from the run directory alone: what the log says, and that it ended
    snap = status_json(m.run_dir)
    c = snap["counts"]
    assert snap["source"] == "log" and snap["ended"] is True
    assert c["tasks_submitted"] == c["tasks_done"] == total and c["tasks_failed"] == 1
    assert c["workers_lost"] == 1 and c["workers_joined"] == 3 and c["workers_connected"] == 0
    assert snap["categories"]["bad"]["failed"] == 1 and snap["categories"]["flaky"]["retried"] >= 1
    r = status(m.run_dir)
    assert r.returncode == 0 and "THE RUN HAS ENDED" in r.stdout, r
    # what the manager left in status.json (read at once) is what replaying the whole log gives
    assert os.path.exists(os.path.join(m.run_dir, "status.json"))
    replayed = final_snapshot(replay(os.path.join(m.run_dir, "transactions.jsonl")))
    assert replayed["counts"] == c and replayed["categories"] == snap["categories"]
    # the live figures and the log's agree (one reader of the log for both)
    live = m.stats
    for k in ("tasks_submitted", "tasks_done", "tasks_failed", "tasks_retried", "workers_joined", "workers_lost"):
        assert c[k] == live[k], k


def assert_refused_on_the_wire(m, secret):
    """A client with a wrong secret gets the hello and then a closed connection: no snapshot."""
    sock = socket.create_connection(("127.0.0.1", m.port), timeout=10)
    try:
        a = handshake.Answerer(secret, handshake.STATUS)
        data = b""
        while a.receive_data(data) is None:
            data = sock.recv(65536)
        sock.sendall(a.auth() + messages.encode_bytes(messages.Status()))
        rest = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        assert rest == b"", rest          # not a welcome, not a snapshot: nothing
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    poll(lambda: any(r.get("event") == "rejected" for r in read_journal(m)), 10, "the rejection in the journal")


def test_status_mac_is_neither_a_worker_nor_a_tunnel_mac():
    s = auth.new_secret()
    for greeter_roles, answerer_roles in ((handshake.WORKER, handshake.STATUS), (handshake.TUNNEL, handshake.STATUS)):
        g, a = handshake.Greeter(s, greeter_roles), handshake.Answerer(s, answerer_roles)
        hello = g.hello()
        if greeter_roles is handshake.TUNNEL:
            with pytest.raises(Exception):
                a.receive_data(hello)          # not even the same hello
            continue
        a.receive_data(hello)
        with pytest.raises(handshake.AuthFailed):
            g.receive_data(a.auth())
    # the manager's greeter takes either, and says which one the peer proved
    for roles in (handshake.WORKER, handshake.STATUS):
        g, a = handshake.Greeter(s, handshake.WORKER, handshake.STATUS), handshake.Answerer(s, roles)
        a.receive_data(g.hello())
        g.receive_data(a.auth())
        assert g.roles is roles
        assert a.receive_data(g.welcome()) is not None      # its welcome proves the matching role
    with pytest.raises(ValueError):
        handshake.Greeter(s, handshake.WORKER, handshake.TUNNEL)


def test_tracker_counts_from_records_and_replay(tmp_path):
    """The figures from a synthetic log: the live feed and the replay of the file agree."""
    recs = [{"event": "manager started", "address": "h:1", "name": "p", "time": 100.0},
            {"event": "worker joined", "worker": 1, "host": "n1", "resources": {"cores": 2, "memory": 1000}, "time": 100.5},
            {"event": "submitted", "task": 1, "category": "a", "tag": "x", "resources": {"cores": 1}, "time": 101.0},
            {"event": "submitted", "task": 2, "category": "a", "resources": {"cores": 1}, "time": 101.0},
            {"event": "dispatched", "task": 1, "worker": 1, "time": 102.0},
            {"event": "dispatched", "task": 2, "worker": 1, "time": 103.0},
            {"event": "worker lost", "worker": 1, "host": "n1", "reason": "killed", "tasks": [1, 2], "time": 104.0},
            {"event": "requeued", "task": 1, "reason": "worker 1 lost", "time": 104.0},
            {"event": "requeued", "task": 2, "reason": "worker 1 lost", "time": 104.0},
            {"event": "worker joined", "worker": 2, "host": "n2", "resources": {"cores": 1}, "time": 105.0},
            {"event": "dispatched", "task": 2, "worker": 2, "time": 105.5},
            {"event": "done", "task": 2, "worker": 2, "result": "success", "category": "a", "time": 106.0}]
    t = Tracker()
    for r in recs:
        t.feed(dict(r))
    snap = t.snapshot(107.0)
    c = snap["counts"]
    assert (c["tasks_submitted"], c["tasks_waiting"], c["tasks_running"], c["tasks_done"]) == (2, 1, 0, 1)
    assert (c["workers_connected"], c["workers_lost"], c["workers_busy"], c["committed_cores"]) == (1, 1, 0, 0)
    assert c["total_cores"] == 1 and c["tasks_retried"] == 2
    assert snap["lost_reasons"] == {"killed": 1} and snap["workers_lost"][0]["tasks"] == 2
    assert snap["categories"]["a"] == {"submitted": 2, "waiting": 1, "running": 0, "done": 1, "failed": 0, "retried": 2}
    assert snap["oldest_running"] is None and not snap["ended"]
    path = tmp_path / "transactions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"torn')
    assert replay(str(path)).snapshot(107.0) == snap


def test_running_counts_from_started_records():
    """On a worker from `dispatched`, running from `started`; the oldest running is the first started."""
    t = Tracker()
    for r in [{"event": "manager started", "time": 100.0},
              {"event": "worker joined", "worker": 1, "host": "n1", "resources": {"cores": 4}, "time": 100.0},
              *({"event": "submitted", "task": i, "category": "a", "resources": {"cores": 1}, "time": 101.0}
                for i in (1, 2, 3)),
              *({"event": "dispatched", "task": i, "worker": 1, "time": 102.0} for i in (1, 2, 3)),
              {"event": "started", "task": 1, "worker": 1, "attempt": 1, "queued": False, "time": 102.0},
              {"event": "started", "task": 9, "worker": 1, "attempt": 1, "queued": True, "time": 102.5},
              {"event": "done", "task": 1, "worker": 1, "result": "success", "time": 103.0},
              {"event": "started", "task": 2, "worker": 1, "attempt": 1, "queued": True, "time": 103.0}]:
        t.feed(r)
    snap = t.snapshot(104.0)
    c = snap["counts"]
    assert (c["tasks_running"], c["tasks_on_workers"], c["tasks_waiting"], c["tasks_done"]) == (1, 2, 1, 1)
    consistent(c)
    assert snap["categories"]["a"]["running"] == 1
    assert (snap["oldest_running"]["task"], snap["oldest_running"]["running_for"]) == (2, 1.0)


def test_stats_reads_as_attributes_and_keys():
    s = Stats(tasks_done=3, done=2)
    assert s.tasks_done == s["tasks_done"] == 3 and dict(s) == {"tasks_done": 3, "done": 2}
    with pytest.raises(AttributeError):
        s.nothing


@pytest.mark.timeout(120)
def test_vinehpc_run_metrics_port(tmp_path):
    """`vinehpc run --metrics-port N`: the script's Manager serves its figures on loopback port N."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "tasks.py"
    script.write_text(
        "import urllib.request, vinehpc\n"
        "m = vinehpc.Manager()\n"
        "assert m.metrics_port == %d, m.metrics_port\n"
        "m.submit(vinehpc.Task('true'))\n"
        "assert m.wait(30).successful()\n"
        "text = urllib.request.urlopen('http://127.0.0.1:%d/metrics', timeout=10).read().decode()\n"
        "assert 'vinehpc_tasks_done_total 1.0' in text, text\n"
        "m.close()\n"
        "assert vinehpc.Manager(local_workers=0, run_dir=%r).metrics_port is None   # off by default\n"
        % (port, port, str(tmp_path / "other")))
    r = subprocess.run([sys.executable, "-m", "vinehpc", "run", "-n", "1", "--metrics-port", str(port), str(script)],
                       capture_output=True, text=True, timeout=100, cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def test_a_run_whose_manager_died_is_read_from_its_log(tmp_path):
    """No "manager stopped" and nobody at the address: the log's figures, and a clear warning."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = "127.0.0.1:%d" % s.getsockname()[1]          # closed again: refused
    run = tmp_path / "vine-run-info" / "crashed"
    run.mkdir(parents=True)
    auth.write_secret(str(run / "secret"), auth.new_secret())
    recs = [{"event": "manager started", "address": dead, "time": 100.0},
            {"event": "submitted", "task": 1, "category": "a", "resources": {"cores": 1}, "time": 101.0},
            {"event": "submitted", "task": 2, "category": "a", "resources": {"cores": 1}, "time": 101.0},
            {"event": "done", "task": 1, "result": "success", "category": "a", "time": 102.0}]
    (run / "transactions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    r = subprocess.run([sys.executable, "-m", "vinehpc", "status", "--json"], capture_output=True, text=True,
                       timeout=60, cwd=tmp_path, env=dict(os.environ, VINEHPC_RUN_DIR=str(run.parent)))
    assert r.returncode == 0, r.stderr                      # no target: the newest run directory
    snap = json.loads(r.stdout)
    assert snap["source"] == "log" and not snap["ended"] and dead in snap["why"]
    assert (snap["counts"]["tasks_submitted"], snap["counts"]["tasks_done"], snap["counts"]["tasks_waiting"]) == (2, 1, 1)
    r = status(str(run))
    assert r.returncode == 0 and "not answering" in r.stdout and "may have crashed" in r.stdout, r
    r = status(str(tmp_path / "nothing-here"))
    assert r.returncode == 2 and "neither a run directory" in r.stderr
