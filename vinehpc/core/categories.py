"""Task categories: how much memory/disk a task of a kind is given, learnt from the kind's history.

Users rarely know what a task needs, and tasks of one kind vary (2 GB to 30 GB in the same
workflow).  A category collects the measured peaks of its completed tasks and picks each new
task's allocation by its mode:

  fixed                 what the task asked for (or the category's first guess)
  max                   the largest peak seen so far
  min-waste             the allocation that minimises the expected waste (unused memory, plus the
                        whole first attempt when the task does not fit and is retried at the max)
  max-throughput        the allocation that maximises expected tasks per unit of resource
  greedy-bucketing      Phung & Thain (IPDPS 2024): the sorted peaks are split into buckets (greedily,
  exhaustive-bucketing  or by trying every split into at most 4 buckets) minimising the expected cost;
                        a new task draws a bucket with probability proportional to its records and is
                        given the bucket's top; after an exhaustion it goes to the next bucket up.
The learnt modes other than `max` leave at most `retry_budget` of the tasks too small (default 5%;
None: no limit, the paper's method), and price a too-small attempt at what it lasted (the
category's exhausted attempts vs its successful runs), not a whole run.
Before SAMPLES completed tasks, a task gets the category's first guess (default: a whole worker).
A task that exhausts its allocation is retried with a larger one (the next bucket, else twice the
allocation or the largest peak seen, and at least 1/8 above what it was seen using), up to the
category's max, without spending its retries; what it was seen using counts at once for `max`.
Pure logic: no I/O, no clock; the caller passes times and a random number generator.
"""
from __future__ import annotations

import bisect
import itertools
import random
from array import array

MODES = ("fixed", "max", "min-waste", "max-throughput", "greedy-bucketing", "exhaustive-bucketing")
LEARNED = ("memory", "disk")      # resources allocated from history (cores/gpus stay as requested)
SAMPLES = 5
RETRY_BUDGET = 0.05   # default: one task in 20 may run twice (None: no limit)
MIN_GAIN = 0.03       # a bucket split must promise to cut the expected cost by 3% of one bucket's


class Category:
    def __init__(self, name, mode="max", rng=None):
        self.name = name
        self.mode = check_mode(mode)
        self.first = {}            # resource -> first guess (absent: a whole worker)
        self.max = {}              # resource -> never allocate more
        # measured peaks of successful tasks and their runs' wall times, in arrival order and put
        # in order of peak only when learnt from (_in_order): an insertion in order at each result
        # moved half the list, O(tasks) a task -- 1 ms a result at 300,000 tasks (issue 15).
        # Arrays of doubles: 8 bytes a record, not a float object's 32, and nothing for the
        # garbage collector to walk (a list of a million floats was walked at each full collection)
        self.peaks = {k: array("d") for k in LEARNED}
        self.walls = {k: array("d") for k in LEARNED}    # in the same order as peaks
        self._ordered = dict.fromkeys(LEARNED, 0)   # peaks[k][:n] are in order
        self.top = dict.fromkeys(LEARNED)        # the largest peak seen (None: none yet)
        self.buckets = {}          # resource -> list of (top, weight) for bucketing modes
        self.rng = rng or random.Random(1)
        self.retry_budget = RETRY_BUDGET   # share of tasks a learnt allocation may send back for a retry
        self.choice = {}           # resource -> allocation chosen by min-waste / max-throughput
        self._fit_at = 0           # n_done when buckets / choice were last computed
        self._next_fit = 1         # ... and computed again when n_done reaches this (_refit)
        self.n_done = 0
        self.wall_sum = 0.0        # successful runs' wall time (fast abort compares with the mean)
        self.wall_n = 0
        self.fail_wall_sum = 0.0   # exhausted attempts' wall time (what a too-small allocation costs)
        self.fail_wall_n = 0
        self.exhaustions = 0
        self.retried = set()
        self.at_least = {k: 0.0 for k in LEARNED}  # the most an exhausted attempt was seen using (a lower bound)
        self.pending = {k: {} for k in LEARNED}    # task -> what its exhausted attempt used, until it succeeds
        self._version = 0          # bumped when what allocations are learnt from changes
        self.allocated_time = {k: 0.0 for k in LEARNED}   # sum of allocation x wall
        self.used_time = {k: 0.0 for k in LEARNED}        # sum of peak x wall

    # -- learning ------------------------------------------------------------------
    def record(self, measured: dict, allocated: dict, wall: float, ok: bool, task=None) -> None:
        """A finished attempt (of `task`, an id): its measured use and what it was given."""
        wall = float(wall) if wall and wall > 0 else 0.0
        for k in LEARNED:
            if ok and self.pending[k]:
                self.pending[k].pop(task, None)
            seen = measured.get(k) if measured else None
            alloc = allocated.get(k) if allocated else None
            if seen is None and not alloc:
                continue            # (a result once per task: most give neither)
            used = float(seen or 0.0)
            if alloc:
                alloc = float(alloc)
                self.allocated_time[k] += alloc * wall
                self.used_time[k] += min(used, alloc) * wall if ok else 0.0
            if ok and isinstance(seen, (int, float)) and used >= 0:   # 0 too: "uses none" is learnt
                self.peaks[k].append(used)
                self.walls[k].append(wall)
                if self.top[k] is None or used > self.top[k]:
                    self.top[k] = used
        if ok:
            self._version += 1
            self.n_done += 1
            self.wall_sum += wall
            self.wall_n += 1
            if self.n_done >= self._next_fit:
                self._refit()           # each time the records grew by ~10% (exhaustive: ~20 ms)

    def exhausted(self, k, used, wall=None, task=None) -> None:
        """An attempt (of `task`, an id) was stopped after `wall` seconds for using `used` of `k`:
        its kind needs at least that much. It is no sample -- the attempt did not finish -- but
        until the task succeeds, what it used counts as a record of its own (so the allocations
        learn at once that some tasks need more than they were given: they do not wait for a
        big task to succeed while more big tasks fail), and `max` and retries take it at once."""
        if used:
            self.at_least[k] = max(self.at_least[k], float(used))
            if task is not None:
                self.pending[k][task] = max(self.pending[k].get(task, 0.0), float(used))
                self._version += 1
                if self.n_done >= SAMPLES and self.top[k] is not None and used > self.top[k]:
                    self._refit()       # a new top: the allocations must learn it now
        if wall is not None and wall >= 0:
            self.fail_wall_sum += float(wall)
            self.fail_wall_n += 1

    def set_mode(self, mode) -> None:
        self.mode = check_mode(mode)
        self._version += 1
        self._refit()

    def set_retry_budget(self, budget) -> None:
        self.retry_budget = budget
        self._version += 1
        self._refit()

    def _refit(self) -> None:
        """Recompute the buckets or the single allocation (min-waste, max-throughput) from the
        records: when they grew by ~10%, when an exhaustion shows a new top, when the budget
        changes -- not per task (they cost O(records))."""
        self.buckets, self.choice = {}, {}
        self._fit_at = f = self.n_done
        # at each of the first 20 records, then at ~10% more (at least 10 more)
        self._next_fit = f + 1 if f < 20 else max(f + 10, f * 1.1)
        for k in LEARNED:
            if self.top[k] is None or self.mode in ("fixed", "max"):
                continue
            values, walls = self._values(k)
            if self.mode.endswith("bucketing"):
                self.buckets[k] = _buckets(values, exhaustive=self.mode.startswith("exhaustive"),
                                           retry_budget=self.retry_budget, fail=self.fail_share(), walls=walls)
            else:
                self.choice[k] = _single(values, walls, self.mode, self.retry_budget, self.fail_share())

    def _values(self, k):
        """The sorted records allocations are learnt from and their runs' wall times: successful
        peaks, and what tasks still under way were seen using when stopped (as long as the mean)."""
        peaks, walls = self._in_order(k)
        if not self.pending[k]:
            return peaks, walls
        mean = self.wall_sum / self.wall_n if self.wall_n else 1.0
        pairs = sorted(list(zip(peaks, walls)) + [(v, mean) for v in self.pending[k].values()])
        return [v for v, _ in pairs], [w for _, w in pairs]

    def _in_order(self, k):
        """peaks[k] in order (and walls[k] with them), as an insertion of each in order would
        have put them: equal peaks in arrival order (a stable sort of what came since the last
        time behind what was in order then).  Called at a refit: every ~10% more records."""
        peaks, walls = self.peaks[k], self.walls[k]
        if self._ordered[k] < len(peaks):
            order = sorted(range(len(peaks)), key=peaks.__getitem__)
            peaks = self.peaks[k] = array("d", [peaks[i] for i in order])
            walls = self.walls[k] = array("d", [walls[i] for i in order])
            self._ordered[k] = len(peaks)
        return peaks, walls

    def fail_share(self) -> float:
        """How long an exhausted attempt lasts, as a share of a successful run's mean (1 until 3
        of each are known): what a too-small allocation costs the run."""
        if self.fail_wall_n < 3 or self.wall_n < 3 or self.wall_sum <= 0:
            return 1.0
        return min(1.0, max(0.05, (self.fail_wall_sum / self.fail_wall_n) / (self.wall_sum / self.wall_n)))

    # -- deciding ------------------------------------------------------------------
    def allocation(self, requested: dict, previous: dict | None = None) -> dict:
        """Resources for the next attempt of a task that asked for `requested` (None values:
        not asked). `previous`: the allocation it exhausted, to go above. A resource left None
        means "a whole worker"."""
        out = {}
        for k in LEARNED:
            asked = requested.get(k)
            prev = (previous or {}).get(k)
            if previous is not None and prev:
                out[k] = self._larger(k, prev)
            elif self.mode == "fixed" or (asked and self.mode == "fixed"):
                out[k] = asked or self.first.get(k)
            elif self.n_done < SAMPLES or self.top[k] is None:
                out[k] = asked or self.first.get(k)
            else:
                out[k] = self._learned(k)
            if out[k] is not None and self.max.get(k):
                out[k] = min(out[k], self.max[k])
        return out

    def _learned(self, k) -> float:
        """At least 1 MB: a kind that used none of `k` is given 1 MB of it (not a whole worker's,
        which would let one such task run per worker), and retried larger if it ever needs more."""
        return max(1.0, self._learnt(k))

    def _learnt(self, k) -> float:
        top = self.top[k]
        if self.mode == "max":
            return _round_up(max(top, self.at_least[k]))
        if self.mode in ("min-waste", "max-throughput"):
            return self.choice.get(k) or _round_up(top)
        buckets = self.buckets.get(k) or [(top, 1)]
        total = sum(w for _, w in buckets)
        x = self.rng.random() * total
        for b_top, w in buckets:
            x -= w
            if x <= 0:
                return _round_up(b_top)
        return _round_up(buckets[-1][0])

    def larger(self, k, prev, used=None) -> float | None:
        """The allocation after an exhaustion of `k` at `prev` (None: nothing larger allowed)."""
        return self._larger(k, prev, used)

    def _larger(self, k, prev, used=None) -> float | None:
        """After an exhaustion at `prev` (the attempt was seen using `used`): the next bucket
        up, else the largest peak seen if larger, else twice -- and never less than what the
        attempt was seen using, plus an eighth; None (a whole worker) when nothing larger is
        allowed."""
        cands = [b for b, _ in self.buckets.get(k, ()) if b > prev]
        if cands:
            nxt = _round_up(min(cands))
        elif self.top[k] is not None and self.top[k] > prev:
            nxt = _round_up(self.top[k])
        else:
            nxt = prev * 2
        if used and used * 1.125 > nxt:
            nxt = _round_up(used * 1.125)
        cap = self.max.get(k)
        if cap:
            if prev >= cap:
                return None
            nxt = min(nxt, cap)
        return nxt

    # -- reporting -----------------------------------------------------------------
    def stats(self) -> dict:
        waste = {k: self.allocated_time[k] - self.used_time[k] for k in LEARNED}
        return {"category": self.name, "mode": self.mode, "done": self.n_done, "exhaustions": self.exhaustions,
                "mean wall": (self.wall_sum / self.wall_n) if self.wall_n else None,
                "tasks retried": len(self.retried), "first guess": dict(self.first), "max": dict(self.max),
                "retry budget": self.retry_budget,
                "largest peak": dict(self.top),
                "allocated x seconds": dict(self.allocated_time), "used x seconds": dict(self.used_time),
                "waste x seconds": waste,
                "buckets": {k: [b for b, _ in v] for k, v in self.buckets.items()}}


def check_mode(mode) -> str:
    if mode not in MODES:
        raise ValueError("category mode must be one of %s, got %r" % (", ".join(MODES), mode))
    return mode


def _round_up(v: float) -> float:
    """Allocations in whole MB, rounded up to 1/128 of their power of two (0.4-0.8%: coarser
    steps cost real memory on narrow distributions; a retry is at least 1/8 larger anyway)."""
    if v <= 0:
        return 0
    step = max(1, 2 ** max(0, int(v).bit_length() - 7))
    return float(-(-int(v + 0.999) // step) * step)


def _single(values, walls, mode, retry_budget, fail) -> float:
    """min-waste: the allocation minimising the expected waste x time (unused memory when a task
    fits; the failed attempt, for `fail` of its run, plus a retry at the top otherwise);
    max-throughput: the one maximising tasks per unit of memory. Among at most ~256 candidate
    allocations (quantiles), each O(log n) with prefix sums."""
    n, top = len(values), values[-1]
    wpre = list(itertools.accumulate(walls, initial=0.0))
    pwpre = list(itertools.accumulate((v * w for v, w in zip(values, walls)), initial=0.0))
    step = max(1, n // 256)
    cands = sorted({max(1.0, _round_up(values[i])) for i in list(range(0, n, step)) + [n - 1]})
    best, best_v = _round_up(top), None
    for a in cands:
        i = bisect.bisect_right(values, a)
        fit = i / n
        if retry_budget is not None and 1 - fit > retry_budget:
            continue
        if mode == "min-waste":
            v = (a * wpre[i] - pwpre[i]) + (fail * a + top) * (wpre[n] - wpre[i]) - (pwpre[n] - pwpre[i])
            better = best_v is None or v < best_v
        else:
            v = fit / a + (1 - fit) / (fail * a + top)
            better = best_v is None or v > best_v
        if better:
            best, best_v = a, v
    return best


def _cost(values, cut_points, fail=1.0, tpre=None):
    """(expected allocation x time per task, share of tasks retried) when a task draws bucket i
    with probability w_i (its share of the records) and is given its top (rounded up as
    allocations are: the records up to it are the bucket's), climbing bucket by bucket while it
    does not fit. A task whose value lies in bucket j costs top_i if j <= i, else
    fail*top_i + ... + fail*top_(j-1) + top_j, and is retried; `fail`: how long a failed attempt
    lasts, as a share of a whole run. `tpre`: prefix sums of the records' wall times, so that a
    bucket of long tasks weighs what it holds memory for (None: every task as long). O(buckets^2)."""
    n = len(values)
    tops = [_round_up(values[c - 1]) for c in cut_points]     # what a task of the bucket is given
    bounds = [0] + [bisect.bisect_right(values, t) for t in tops[:-1]] + [n]
    w = [(bounds[i + 1] - bounds[i]) / n for i in range(len(tops))]
    if tpre is None or not tpre[-1]:
        t = w
    else:
        t = [(tpre[bounds[i + 1]] - tpre[bounds[i]]) / tpre[-1] for i in range(len(tops))]
    cost = retried = 0.0
    for i, top_i in enumerate(tops):
        climb = top_i
        for j in range(len(tops)):
            if j > i:
                climb += tops[j] - (1 - fail) * tops[j - 1]
                retried += w[i] * w[j]
            cost += w[i] * t[j] * (top_i if j <= i else climb)
    return cost, retried


def _buckets(values, exhaustive=False, max_buckets=4, retry_budget=None, fail=1.0, walls=None):
    """Split sorted `values` into buckets minimising _cost: [(top, weight)]. `retry_budget`: only
    splits whose expected share of retried tasks stays within it (None: no limit, the paper's
    method). `walls`: each record's wall time (None: all alike)."""
    if walls is not None:
        tpre = list(itertools.accumulate(walls, initial=0.0))
    if len(values) > 512:              # quantiles are enough to place the cuts
        idx = [int(i * (len(values) - 1) / 511) for i in range(512)]
        values = [values[i] for i in idx]
        if walls is not None:          # each kept record stands for the records since the last
            tpre = [0.0] + [tpre[i + 1] for i in idx]
    n = len(values)
    if n < 2 or values[0] == values[-1]:
        return [(values[-1], n)] if values else []
    tp = tpre if walls is not None else None
    limit = 1.0 if retry_budget is None else retry_budget
    cuts = list(range(1, n)) if n <= 65 else sorted({int(i * n / 64) for i in range(1, 64)})
    best = [n]
    best_cost = _cost(values, best, fail, tp)[0]
    margin = MIN_GAIN * best_cost      # a split must promise this much: the model is rough, retries are real
    if exhaustive:
        cand = cuts if len(cuts) <= 24 else [cuts[int(i * (len(cuts) - 1) / 23)] for i in range(24)]
        if limit < 1.0:                # a tight budget is met by cuts near the top: try those finely
            cand = sorted(set(cand) | {c for c in cuts if c >= n * (1 - 2 * limit)})
        for k in range(1, max_buckets):
            for chosen in itertools.combinations(cand, k):
                cp = list(chosen) + [n]
                c, r = _cost(values, cp, fail, tp)
                if r <= limit and c < best_cost - 1e-9:
                    best, best_cost = cp, c
        if best_cost > _cost(values, [n], fail, tp)[0] - margin:
            best = [n]
    else:
        while len(best) < max_buckets:      # greedy: add the single best cut, while it helps
            base, step = best, None
            for cut in cuts:
                if cut in base:
                    continue
                cp = sorted(base + [cut])
                c, r = _cost(values, cp, fail, tp)
                if r <= limit and c < best_cost - max(1e-9, margin):
                    step, best_cost = cp, c
            if step is None:
                break
            best = step
    bounds = [0] + best
    return [(values[best[i] - 1], bounds[i + 1] - bounds[i]) for i in range(len(best))]
