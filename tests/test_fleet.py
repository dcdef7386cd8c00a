"""The simulated fleet (benchmarks/fleet_sim.py) against a real Manager: correctness at a few
hundred workers, never timings (speed is benchmarks/fleet.py's).

Every task comes back exactly once and successful, a task whose worker disconnects in the middle
of its result is run again elsewhere, slow readers do not stop the others, and every worker of a
fleet that connects at once is admitted without being closed and retried.
"""
import importlib.util
import os

import pytest

import vinehpc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("fleet_sim", os.path.join(ROOT, "benchmarks", "fleet_sim.py"))
fleet_sim = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fleet_sim)


def _noop(x):
    return x


def _run(tmp_path, n, tasks, make, **kw):
    fleet_sim.raise_nofile(2 * n + 1024)
    m = vinehpc.Manager(port=0, host="127.0.0.1", run_dir=str(tmp_path / "run"))
    fleet = None
    try:
        fleet = fleet_sim.Fleet(("127.0.0.1", m.port), m.secret_file, n, **kw)
        fleet.connect()
        joined = m.wait_for_workers(n, timeout=60)
        ids = {m.submit(make(i)) for i in range(tasks)}
        back = []
        while len(back) < tasks:
            t = m.wait(60)
            assert t is not None, "%d of %d tasks came back" % (len(back), tasks)
            back.append(t)
        assert m.wait(0.5) is None            # nothing more: no task twice
        report = fleet.report()
    finally:
        m.close()
        if fleet is not None:
            fleet.close()
    return joined, ids, back, report


@pytest.mark.timeout(180)
def test_two_hundred_workers_every_result_once_losses_requeued(tmp_path):
    """200 workers joining at once, 20,000 tasks; 5 workers disconnect in the middle of their first
    result (the task is requeued and runs elsewhere), 3 read their socket slowly."""
    joined, ids, back, rep = _run(tmp_path, 200, 20000, lambda i: vinehpc.Task(":"), disconnect=5, slow=3)
    assert joined == 200
    assert rep.get("retries", 0) == 0, rep        # none closed in its handshake and retried
    assert sorted(t.id for t in back) == sorted(ids)
    assert all(t.successful() for t in back), [(t.id, t.result, t.reason) for t in back if not t.successful()][:5]
    assert rep["lost"] == 5
    # each lost result's task ran again: at least one more attempt per disconnect, and every
    # result the fleet sent in full was returned (none of the half ones)
    assert sum(t.attempts - 1 for t in back) >= 5
    assert rep["results"] == 20000
    assert rep["connected"] == 200            # the 5 came back as well-behaved workers


@pytest.mark.timeout(180)
def test_python_tasks_with_modelled_run_times_on_multicore_workers(tmp_path):
    """PythonTasks on 2-core workers with short random run times: tasks queue and are pipelined on
    the simulated workers (`started` reports), every value comes back once."""
    joined, ids, back, rep = _run(tmp_path, 40, 2000, lambda i: vinehpc.PythonTask(_noop, i), cores=2,
                                  run="exp:0.002", result_size=100)
    assert joined == 40 and rep.get("retries", 0) == 0
    assert sorted(t.id for t in back) == sorted(ids)
    assert all(t.successful() and t.output is None and len(t.std_output) == 100 for t in back)
    assert rep["results"] == 2000


def test_a_burst_of_requests_is_taken_a_bounded_number_per_loop_turn(tmp_path, monkeypatch):
    """A million submits in a burst kept the I/O thread in one loop turn until the inbox was empty
    (no socket read, no keepalive answered meanwhile): now at most INBOX_TURN per turn."""
    import threading
    from vinehpc import server as srv
    from vinehpc.core import Core
    from vinehpc.journal import Journal
    s = srv.Server(Core(), host="127.0.0.1", port=0, secret="s", journal=Journal(None), staging=str(tmp_path),
                   keepalive_interval=5.0, keepalive_timeout=30.0)
    per_turn, ops = [], [0]
    real_op, real_feed = srv.Server._op, srv.Server._feed

    def op(self, o, now):
        ops[0] += 1
        return real_op(self, o, now)

    def feed(self, event, now):
        if event is srv.SCHEDULE:     # (fed once per part of a pass: the later parts of a turn count 0)
            per_turn.append(ops[0])
            ops[0] = 0
        return real_feed(self, event, now)

    monkeypatch.setattr(srv.Server, "_op", op)
    monkeypatch.setattr(srv.Server, "_feed", feed)
    n = 3 * srv.INBOX_TURN + 5
    done = threading.Event()
    for _ in range(n - 1):
        s.post(("call", lambda: None, [], threading.Event()))
    s.post(("call", lambda: None, [], done))
    s.start()
    assert done.wait(60)
    s.stop("test")
    assert s.stopped.wait(30)
    assert max(per_turn) == srv.INBOX_TURN and sum(per_turn) + ops[0] >= n


@pytest.mark.timeout(120)
def test_idle_workers_ping_and_the_manager_does_not_ping_them_too(tmp_path):
    """An idle worker pings after the keepalive interval without a message; the manager answers.
    It used to ping the same workers at the same moment (both answered): twice the traffic an
    idle fleet needs.  Observed over several intervals (idleness is the behaviour under test)."""
    import time
    m = vinehpc.Manager(port=0, host="127.0.0.1", run_dir=str(tmp_path / "run"), keepalive_interval=0.5,
                        keepalive_timeout=20)
    fleet = None
    try:
        fleet = fleet_sim.Fleet(("127.0.0.1", m.port), m.secret_file, 20)
        fleet.connect()
        assert m.wait_for_workers(20, timeout=60) == 20
        time.sleep(4.0)
        rep = fleet.report()
        assert m.wait_for_workers(20, timeout=0) == 20       # nobody lost
    finally:
        m.close()
        if fleet is not None:
            fleet.close()
    assert rep["pings"] >= 20 * 3, rep
    assert rep.get("pinged by the manager", 0) <= rep["pings"] // 4, rep


@pytest.mark.timeout(180)
def test_the_journal_of_a_fleet_run_agrees_with_what_came_back(tmp_path):
    """The journal a fleet run writes (starts riding on their own results are not logged; a long
    turn's records are encoded as they come) read by its readers: a task's records once each and in
    order, the figures replayed from it (`vinehpc status` after the run) and the report's counts
    agree with what wait() returned."""
    import collections
    import json

    from vinehpc import status
    from vinehpc.report.aggregate import load
    joined, ids, back, rep = _run(tmp_path, 40, 3000, lambda i: vinehpc.Task(":"), disconnect=2)
    run_dir = str(tmp_path / "run")
    with open(os.path.join(run_dir, "transactions.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    events = collections.defaultdict(list)
    for r in recs:
        if r.get("task") in ids:
            events[r["task"]].append(r["event"])
    attempts = {t.id: t.attempts for t in back}
    for tid in ids:
        ev = events[tid]
        assert ev[0] == "submitted" and ev[-1] == "done" and ev.count("submitted") == ev.count("done") == 1, ev
        assert ev.count("dispatched") == attempts[tid], ev
        # one attempt at a time: dispatched, then its start if logged, then its end
        attempt = []
        for e in ev[1:]:
            if e == "dispatched":
                assert not attempt, ev
                attempt = [e]
            elif e == "started":
                assert attempt == ["dispatched"], ev
                attempt.append(e)
            else:
                assert attempt and e in ("done", "requeued"), ev
                attempt = []
    figures = status.replay(os.path.join(run_dir, "transactions.jsonl")).counts(0.0)
    assert (figures["tasks_submitted"], figures["tasks_succeeded"], figures["tasks_running"],
            figures["tasks_on_workers"]) == (3000, 3000, 0, 0)
    agg = load(run_dir)
    assert (agg.n["submitted"], agg.n["done"], agg.n["failed"]) == (3000, 3000, 0)
    assert agg.n["attempts"] == sum(attempts.values())


@pytest.mark.timeout(180)
def test_past_the_spread_fleet_tiny_tasks_stay_within_their_budget(tmp_path):
    """150 two-core workers (300 cores: past placement.SPREAD_CORES), 12,000 no-op tasks, 3 workers
    disconnecting in the middle of a result: once the category is known to be tiny, at most
    TINY_BUDGET tasks are out at once (never 2 a core spread over the whole fleet), every result
    comes back once, the lost ones are run again, and the budget is all given back at the end."""
    import json

    from vinehpc.core import placement
    assert 150 * 2 > placement.SPREAD_CORES
    joined, ids, back, rep = _run(tmp_path, 150, 12000, lambda i: vinehpc.Task(":"), cores=2, disconnect=3)
    assert joined == 150 and rep.get("retries", 0) == 0
    assert sorted(t.id for t in back) == sorted(ids) and all(t.successful() for t in back)
    assert rep["lost"] == 3 and rep["results"] == 12000
    out = peak = 0
    per_worker = {}
    runs = []               # consecutive dispatches to one worker: a batch in one message
    with open(os.path.join(str(tmp_path / "run"), "transactions.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if r.get("task") not in ids:
                continue
            if r["event"] == "dispatched":
                out += 1
                per_worker[r["worker"]] = per_worker.get(r["worker"], 0) + 1
                peak = max(peak, out)
                if runs and runs[-1][0] == r["worker"]:
                    runs[-1][1] += 1
                else:
                    runs.append([r["worker"], 1])
            elif r["event"] in ("done", "requeued"):
                out -= 1
    assert out == 0
    # (before the category is known to be tiny, tasks go one a core: 300 out; a lost worker's
    # tasks count until it is found gone, so a little slack for the 3)
    assert peak <= placement.TINY_BUDGET + 3 * 2 * placement.PREFETCH_FACTOR, peak
    assert len(per_worker) > 100        # spread over the fleet all the same, batch after batch
    # one at a time to the least loaded worker before (runs of 1); now mostly whole batches
    batched = sum(k for _, k in runs if k >= placement.PREFETCH_FACTOR // 2)
    assert batched > 12000 // 2, sorted(k for _, k in runs)[-20:]


@pytest.mark.timeout(120)
def test_the_benchmark_reports_its_fleet_line_with_the_best_of_its_runs(tmp_path, capsys):
    """benchmarks/fleet.py end to end, small: N's runs paired with runs on the 10-worker fleet
    (a fresh fleet of N for each, the pair's order alternating), the fastest of each reported
    (every run listed, and each pair's ratio), and the line a script reads."""
    import json
    import sys
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("fleet_bench", os.path.join(ROOT, "benchmarks", "fleet.py"))
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        assert bench.main(["--workers", "20", "--tasks", "300", "--idle", "0.1", "--repeat", "2", "--json"]) == 0
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))
    out = capsys.readouterr()
    ten, twenty = json.loads(out.out)
    assert (ten["workers"], twenty["workers"]) == (10, 20)
    for r in (ten, twenty):
        assert len(r["runs_tasks_per_s"]) == 2 and r["tasks_per_s"] == max(r["runs_tasks_per_s"])
        assert r["joined"] == r["workers"] and "idle_cpu_pct" in r
    assert ten["fleet"]["results"] == 600          # one fleet of 10 for the whole invocation...
    assert twenty["fleet"]["results"] == 300       # ...and a fresh fleet of 20 for each of its runs
    paired = twenty["paired_10_tasks_per_s"]       # the 10-worker runs paired with N's: all of them, here
    assert sorted(paired) == sorted(ten["runs_tasks_per_s"])
    assert twenty["ratio_to_10"] == round(twenty["tasks_per_s"] / max(paired), 3)
    assert len(twenty["pair_ratios"]) == 2 and all(x > 0 for x in twenty["pair_ratios"])
    line = [x for x in out.err.splitlines() if x.startswith("FLEET ")]
    assert len(line) == 1 and line[0].startswith("FLEET workers=20 tasks=300 tasks_per_s=")
    assert "ratio_to_10=" in line[0] and "mgr_ms_per_task=" in line[0]
    said = [x.split()[:3] for x in out.err.splitlines() if x.startswith("N=")]
    assert said[:2] == [["N=20", "pair", "1"], ["N=20", "pair", "2"]] and [x[0] for x in said[2:]] == ["N=10"]