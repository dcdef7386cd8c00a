"""Categories: allocations learnt from measured use, retries larger after an exhaustion (no sockets)."""
import random

import pytest

from vinehpc.core.categories import Category, _buckets, _cost, _round_up
from vinehpc.core.commands import KillTask, SendTask
from vinehpc.core.events import TICK, BlockHost, SlowMultiplier, UnblockHost
from test_core import Sim, done as returned, logs, new_task, of


def done(sim, wid, task, memory, status="success", wall=1.0, **extra):
    """The worker's result; returns the task if it came back (None: requeued)."""
    res = {"status": status, "exit_code": 0, "wall": wall, "measured": {"memory": memory, "disk": 1}}
    res.update(extra)
    back = returned(sim.result(wid, task, **res))
    return back[0] if back else None


def dispatched_task(sim):
    """The tasks sent since the last look, with the resources each was sent with."""
    sent = of(sim.take(), SendTask)
    tasks = {t.task.id: t.task for t in sim.core.tasks.values()}
    return [tasks[c.tid] for c in sent]


def sent_res(sim, task):
    return sim.ts(task).res


def test_bucketing_finds_the_two_kinds_of_task():
    r = random.Random(0)
    vals = sorted([r.gauss(2000, 300) for _ in range(300)] + [r.gauss(12000, 1000) for _ in range(300)])
    for exhaustive in (False, True):
        tops = [t for t, _ in _buckets(vals, exhaustive=exhaustive)]
        assert any(2000 < t < 4000 for t in tops) and max(tops) >= 12000, tops


def test_max_mode_allocates_the_largest_peak_after_enough_samples():
    sim = Sim()
    sim.join(1, memory=10000, cores=8)
    sim.core.category("sim").mode = "max"
    first = [sim.submit(new_task().set_category("sim")) for _ in range(5)]
    sim.schedule()
    sent = dispatched_task(sim)
    assert len(sent) == 1 and sent_res(sim, sent[0])["memory"] == 10000    # no samples yet: a whole worker
    for i, t in enumerate(first):
        sim.schedule()
        sim.take()
        done(sim, 1, t, memory=100 * (i + 1))
    t = sim.submit(new_task().set_category("sim"))
    sim.schedule()                                    # decided when it is about to run
    assert dispatched_task(sim) == [t] and sent_res(sim, t)["memory"] == _round_up(500)


def test_exhaustion_is_retried_larger_without_spending_retries_then_gives_up_at_the_max():
    sim = Sim()
    sim.join(1)
    t = sim.submit(new_task(memory=100))
    sim.schedule()
    sim.take()
    ex = {"exhausted": {"resource": "memory", "used": 150, "allocated": 100}}
    assert done(sim, 1, t, 150, status="resource exhaustion", **ex) is None     # requeued
    assert sent_res(sim, t)["memory"] == 200 and sim.ts(t).tries == 0
    recs = logs(sim.take(), "retry larger")
    assert recs and recs[0]["was"] == 100 and recs[0]["now"] == 200
    sim.core.category("default").max["memory"] = 200
    sim.schedule()
    sim.take()
    back = done(sim, 1, t, 250, status="resource exhaustion", **ex)
    assert back is t and t.result == "resource exhaustion"


def test_a_whole_worker_guess_waits_for_an_idle_worker():
    sim = Sim()
    sim.join(1, cores=4, memory=4000)
    sim.core.category("big").mode = "greedy-bucketing"
    small = sim.submit(new_task(memory=500))
    sim.schedule()
    assert dispatched_task(sim) == [small]
    whole = sim.submit(new_task().set_category("big"))
    sim.schedule()
    assert dispatched_task(sim) == []                  # memory is taken: not a whole worker's worth
    done(sim, 1, small, 400)
    sim.schedule()
    assert dispatched_task(sim) == [whole] and sent_res(sim, whole)["memory"] == 4000


def test_stats_report_waste_as_allocated_minus_used_times_seconds():
    c = Category("sim", "fixed")
    c.record({"memory": 300}, {"memory": 1000}, 2.0, True)
    c.record({"memory": 900}, {"memory": 1000}, 1.0, True)
    s = c.stats()
    assert s["allocated x seconds"]["memory"] == 3000 and s["used x seconds"]["memory"] == 1500
    assert s["waste x seconds"]["memory"] == 1500 and s["done"] == 2


def test_unknown_mode_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="greedy-bucketing"):
        Category("x", "magic")


# ------------------------------------------------------------------ stragglers and sick workers
def test_fast_abort_requeues_a_straggler_elsewhere_and_blocks_a_repeat_offender():
    sim = Sim()
    sim.join(1, host="slow", cores=1)
    sim.join(2, host="fast", cores=1)
    sim(SlowMultiplier(None, 3.0))
    quick = [sim.submit(new_task()) for _ in range(4)]
    for t in quick:                                   # mean wall 1 s
        sim.schedule()
        sim.take()
        done(sim, sim.ts(t).wid, t, 10, wall=1.0)
    s1 = sim.submit(new_task())
    sim.schedule(10.0)
    sim.take()
    first = sim.ts(s1).wid
    sim(TICK, 12.0)                                   # 2 s: within 3 x mean
    assert of(sim.take(), KillTask) == []
    sim(TICK, 14.0)                                   # 4 s > 3 x 1 s: aborted, requeued, not failed
    cmds = sim.take()
    assert of(cmds, KillTask) == [KillTask(first, s1.id)] and sim.state(s1) == "ready" and sim.ts(s1).tries == 0
    assert logs(cmds, "fast abort")
    sim.schedule(14.0)
    sim.take()
    assert sim.ts(s1).wid != first                    # run again on the other worker


def test_block_host_keeps_tasks_away_until_unblocked():
    sim = Sim()
    sim.join(1, host="sick")
    sim(BlockHost("sick", 0))
    t = sim.submit(new_task())
    sim.schedule(1.0)
    assert dispatched_task(sim) == []
    sim(UnblockHost("sick"))
    sim.schedule(2.0)
    assert dispatched_task(sim) == [t]


def test_worker_side_failures_requeue_without_retries_and_block_the_worker():
    sim = Sim()
    sim.join(1, host="full-disk", cores=1)
    t = sim.submit(new_task())
    for i in range(3):
        sim.schedule()
        assert dispatched_task(sim) == [t]            # the only worker, so it goes back there
        assert returned(sim.result(1, t, status="input missing", worker_fault=True,
                                   reason="No space left on device")) == []
        assert sim.state(t) == "ready" and sim.ts(t).tries == 0   # the task is not at fault
    blocked = logs(sim.take(), "host blocked")
    assert [r["host"] for r in blocked] == [1]        # that worker, not its host
    sim.join(2, 1.0, host="ok", cores=1)
    sim.schedule(1.0)
    assert dispatched_task(sim) == [t] and sim.ts(t).wid == 2


def test_an_exhaustion_teaches_max_mode_at_once_and_the_retry_starts_above_what_was_used():
    """A big task stopped at a small allocation: its kind needs at least what it was seen using.
    The retry goes straight above that (not 2x, 4x, ... up a ladder) and first in line, and `max`
    allocates it to the next tasks of the kind before any big one has succeeded."""
    sim = Sim()
    sim.join(1, memory=10000, cores=8)
    sim.core.category("sim").mode = "max"
    first = [sim.submit(new_task().set_category("sim")) for _ in range(5)]
    for i, t in enumerate(first):
        sim.schedule()
        sim.take()
        done(sim, 1, t, memory=60)
    big, other = (sim.submit(new_task().set_category("sim")) for _ in range(2))
    sim.schedule()
    sim.take()
    assert sent_res(sim, big)["memory"] == _round_up(60)
    ex = {"exhausted": {"resource": "memory", "used": 300, "allocated": sent_res(sim, big)["memory"]}}
    assert done(sim, 1, big, 300, status="resource exhaustion", **ex) is None
    grown = sent_res(sim, big)["memory"]
    assert grown >= 300 * 1.125 and grown <= _round_up(300 * 1.125)
    assert sim.core.ready[0] == big.id                        # first in line
    later = sim.submit(new_task().set_category("sim"))
    sim.schedule()
    sim.take()
    assert sent_res(sim, later)["memory"] >= 300              # max learnt from the exhaustion
    # the log says what each finished task was given and used
    back = done(sim, 1, other, memory=60)
    assert back is other
    recs = [r for r in logs(sim.take(), "done") if r["task"] == other.id]
    assert recs and recs[0]["category"] == "sim" and recs[0]["measured"]["memory"] == 60
    assert recs[0]["allocated"]["memory"] == _round_up(60)
    assert other.resources_allocated["memory"] == _round_up(60)      # and so does the task


def _retried(vals, buckets):
    cuts, acc = [], 0
    for _, w in buckets:
        acc += w
        cuts.append(acc)
    return _cost(vals, cuts)[1]


def test_the_retry_budget_bounds_how_many_tasks_a_bucket_split_leaves_too_small():
    """One category mixing two kinds (70% small): the paper's split draws the small bucket for a
    big task often (~20% retried); within a 5% budget the split leaves at most 5% too small."""
    r = random.Random(1)
    vals = sorted(r.gauss(2000, 300) if r.random() < 0.7 else r.gauss(12000, 1000) for _ in range(400))
    for exhaustive in (False, True):
        free = _buckets(vals, exhaustive=exhaustive)
        tight = _buckets(vals, exhaustive=exhaustive, retry_budget=0.05)
        assert _retried(vals, free) > 0.15, free
        assert _retried(vals, tight) <= 0.05, tight
        assert sum(w for _, w in tight) == len(vals)


def test_min_waste_within_the_budget_fits_all_but_the_budget_and_none_lifts_it():
    r = random.Random(2)
    peaks = [r.gauss(2000, 300) if r.random() < 0.7 else r.gauss(12000, 1000) for _ in range(200)]
    allocs = {}
    for budget in (0.05, None):
        c = Category("sim", "min-waste")
        c.set_retry_budget(budget)
        for p in peaks:
            c.record({"memory": p}, {"memory": 4000}, 1.0, True)
        allocs[budget] = c.allocation({})["memory"]
    fits = sum(p <= allocs[0.05] for p in peaks) / len(peaks)
    assert fits >= 0.95
    assert allocs[None] < 4000                    # unconstrained, it gambles on the small kind


def test_a_short_lived_exhaustion_makes_a_small_bucket_cheaper_to_try():
    """What a too-small attempt costs is what it lasted: measured from the category's exhausted
    attempts (1 = a whole run, until 3 of each are known)."""
    c = Category("sim", "greedy-bucketing")
    assert c.fail_share() == 1.0
    for _ in range(3):
        c.record({"memory": 100}, {"memory": 200}, 10.0, True)
        c.exhausted("memory", 150, wall=1.0)
    assert abs(c.fail_share() - 0.1) < 1e-9
    vals = sorted([100.0] * 90 + [1000.0] * 10)
    assert _cost(vals, [90, 100], fail=0.1)[0] < _cost(vals, [90, 100], fail=1.0)[0]
    c.set_retry_budget(None)
    assert c.retry_budget is None


def test_set_category_retry_budget_refuses_what_is_not_a_share(make_manager):
    m = make_manager(port=0, host="127.0.0.1")
    for bad in (-0.1, 1.5, "5%", True):
        with pytest.raises(ValueError, match="retry budget"):
            m.set_category_retry_budget("sim", bad)
    m.set_category_retry_budget("sim", 0.1)
    m.set_category_retry_budget("sim", 1)           # no limit
    m.set_category_mode("sim", "greedy-bucketing")
    assert m.stats_category("sim")["retry budget"] is None
    m.set_category_retry_budget("sim", 0.02)
    assert m.stats_category("sim")["retry budget"] == 0.02


def test_the_benchmarks_bound_spends_the_retry_budget_where_it_saves_most():
    """benchmarks/categories.py's bound (what no allocator blind to task contents can beat)."""
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "categories.py")
    spec = importlib.util.spec_from_file_location("bench_categories", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    # 20 tasks of peaks 1..20 MB, 1 s each; 5% = one task may be left too small: allocate 19
    samples = [("a", float(u), 1.0, 20.0) for u in range(1, 21)]
    assert bench.oracle(samples, 0.0) == sum(20 - u for u in range(1, 21))
    assert bench.oracle(samples, 0.05) == sum(19 - u for u in range(1, 20))
    # a task that ran on the first guess (a whole worker) wastes what it wasted, whatever the budget
    first = ("a", 10.0, 2.0, float(bench.WORKER_MB))
    assert bench.oracle(samples + [first], 0.0) == 190 + (bench.WORKER_MB - 10) * 2
    # two categories, one retry in all: it goes where it saves most (b's outlier)
    b = [("b", 1.0, 1.0, 20.0)] * 19 + [("b", 100.0, 1.0, 200.0)]
    assert bench.oracle(b, 0.05) == 0.0
    assert bench.oracle(samples + b, 0.025) == 190          # a keeps its 20 MB; b drops 19 x 99 MB of waste


def test_a_kind_that_writes_nothing_is_not_given_a_whole_workers_disk():
    """Learnt modes learn "uses no disk" too: 1 MB of it, so such tasks share a worker (a whole
    worker's disk, as before any sample, let one run per worker)."""
    for mode in ("max", "greedy-bucketing", "min-waste", "max-throughput"):
        sim = Sim()
        sim.join(1, memory=10000, cores=8)
        sim.core.category("sim").mode = mode
        for _ in range(5):
            t = sim.submit(new_task().set_category("sim"))
            sim.schedule()
            sim.take()
            res = {"status": "success", "exit_code": 0, "wall": 1.0, "measured": {"memory": 100, "disk": 0.0}}
            assert returned(sim.result(1, t, **res)) == [t]
        pair = [sim.submit(new_task().set_category("sim")) for _ in range(2)]
        sim.schedule()
        assert dispatched_task(sim) == pair, mode
        assert all(sent_res(sim, t)["disk"] == 1 and sent_res(sim, t)["memory"] >= 100 for t in pair), mode


def test_buckets_weigh_tasks_by_how_long_they_hold_their_memory():
    """Waste is memory x time: a split that pays off when all tasks are alike stops paying when
    the tasks it sends back for a retry are the long ones."""
    vals = [250.0] * 95 + [296.0] * 5
    alike = _buckets(vals)
    long_big = _buckets(vals, walls=[1.0] * 95 + [4.0] * 5)
    assert len(alike) == 2, alike
    assert len(long_big) == 1, long_big
    many = sorted(random.Random(3).gauss(2000, 300) for _ in range(2000))     # > 512: quantiles
    assert _buckets(many, walls=[1.0] * 2000) == _buckets(many)


def test_records_are_learnt_from_in_order_of_peak_whatever_order_they_came_in():
    """Peaks are kept as they come (an insertion in order at each result cost O(tasks)) and put in
    order when learnt from: as if each had been inserted in order -- walls with their peaks, equal
    peaks in arrival order -- also after more records came behind ones already in order."""
    rng = random.Random(7)
    c = Category("c", "min-waste")
    seen = []
    for i in range(300):
        peak, wall = float(rng.randint(0, 20)), float(i)        # many equal peaks
        c.record({"memory": peak, "disk": 1.0}, {"memory": 64}, wall, True, task=i)
        seen.append((peak, wall))
        if i in (10, 150, 299):
            want = sorted(seen, key=lambda pw: pw[0])          # stable: equal peaks in arrival order
            assert [list(x) for x in c._values("memory")] == [[p for p, _ in want], [w for _, w in want]]
    assert c.top == {"memory": 20.0, "disk": 1.0}
    assert c.stats()["largest peak"] == {"memory": 20.0, "disk": 1.0}
