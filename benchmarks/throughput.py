#!/usr/bin/env python3
"""Task throughput of vinehpc against concurrent.futures.ProcessPoolExecutor and Dask.

Run by hand (not a test):  python benchmarks/throughput.py [--json] [--workloads W1,W3]
                                                           [--repeat K] [--no-dask] [--ssl]

Every system gets 2 single-threaded workers on this machine; the systems run one after the
other, each warmed up first.  Workloads:
  W1  2,000 no-op Python calls, all submitted, then all waited for
  W2  500 shell commands `echo x > out.txt`, the file brought back to the caller
  W3  200 Python calls that each read the same 50 MiB input and return its length
      (vinehpc: a fresh input per repeat, declared cache=True; it must cross to each
      worker exactly once, i.e. 2 transfers)
  W4  200 sequential round trips of one no-op call (median and p90 latency)
  F1  W1 as serverless FunctionCalls to a library (exec_mode "direct"), vinehpc only
  F4  W4 as serverless FunctionCalls, vinehpc only
      (F1/F4 are compared with TaskVine's serverless direct mode measured on this machine,
      TASKVINE_DIRECT, and with vinehpc's own W1/W4 rows of the same run)
Speed ratios are vinehpc / peer (>1: vinehpc faster); for W4 the speed is 1/median.
--ssl: vinehpc also runs with TLS (Manager(ssl=True)), plain and TLS taking turns repeat by
repeat, and its cost is reported per workload as TLS speed / plain speed and as the manager
I/O thread's CPU per 1,000 tasks (steadier than rates on a loaded machine).
See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import faulthandler
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

COUNTS = {"W1": 2000, "W2": 500, "W3": 200, "W4": 200, "F1": 2000, "F4": 200}
TITLES = {"W1": "W1 2000 no-op Python calls", "W2": "W2 500 `echo x > out.txt`",
          "W3": "W3 200 reads of one 50 MiB input", "W4": "W4 200 sequential round trips",
          "F1": "F1 2000 no-op FunctionCalls", "F4": "F4 200 sequential FunctionCalls"}
VINE_ONLY = ("F1", "F4")          # serverless: no ProcessPool or Dask equivalent
# TaskVine 7's serverless direct mode, 2 workers on this machine (not installed here: fixed numbers)
TASKVINE_DIRECT = {"rate": 600.0, "median_ms": 1.9}
LATENCY = ("W4", "F4")
INPUT_BYTES = 50 * 1024 * 1024
WARMUP = 20
SYSTEMS = ("vinehpc", "processpool", "dask")


def progress(*a):
    print("[bench %6.1fs]" % (time.perf_counter() - T0), *a, file=sys.stderr, flush=True)


T0 = time.perf_counter()


# --------------------------------------------------------------------------- task bodies
# Module level: ProcessPool (fork) finds them by reference, vinehpc and Dask pickle them by value.
def noop(i):
    return i


def shell_echo(base):
    d = tempfile.mkdtemp(dir=base)
    subprocess.run("echo x > out.txt", shell=True, cwd=d, check=True)
    with open(os.path.join(d, "out.txt")) as f:
        return f.read()


def read_len(path):
    with open(path, "rb") as f:
        return len(f.read())


# --------------------------------------------------------------------------- helpers
class BenchError(Exception):
    pass


def make_input(path, size=INPUT_BYTES):
    """Random bytes (so every repeat's input has a new content name)."""
    with open(path, "wb") as f:
        left = size
        while left:
            k = min(left, 1 << 22)
            f.write(os.urandom(k))
            left -= k
    return path


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def latency_result(lat):
    total = sum(lat)
    return {"n": len(lat), "seconds": total, "rate": len(lat) / total,
            "median_ms": statistics.median(lat) * 1e3, "p90_ms": pct(lat, 0.9) * 1e3,
            "max_ms": max(lat) * 1e3}


def check_same(values, expect):
    if values != expect:
        diff = next(i for i, (a, b) in enumerate(zip(values + [None], expect + [None])) if a != b)
        raise BenchError("results differ from the arguments at position %d: %r" % (diff, values[diff:diff + 3]))


def check_values(values, expect, what):
    bad = [v for v in values if v != expect]
    if bad:
        raise BenchError("%d of %d %s returned %r, expected %r" % (len(bad), len(values), what, bad[0], expect))


# --------------------------------------------------------------------------- vinehpc
class Vine:
    name = "vinehpc"
    ssl = False

    def __init__(self, tmp, timeout):
        import vinehpc
        self.vinehpc = vinehpc
        self.tmp, self.timeout = tmp, timeout
        self.run_dir = tempfile.mkdtemp(prefix="vine-run-", dir=tmp)
        self.m = vinehpc.Manager(local_workers=2, run_dir=self.run_dir, ssl=self.ssl)
        self.m.wait_for_workers(2, timeout=60)
        self.w3 = []            # (cachename, result dict) per W3 repeat, transfers filled at close
        self.hook_puts = None
        self.workers_seen = None
        self.cpu_total = None
        self.tasks_total = 0
        self._hook()

    def _hook(self):
        # Fallback for counting input transfers if the journal has no "put" records: count the
        # manager I/O thread's put commands (instance attribute shadows Server._cmd_put).
        srv = getattr(self.m, "_server", None)
        orig = getattr(srv, "_cmd_put", None)
        if orig is None:
            return
        self.hook_puts = {}

        def counting_put(p, f, n, *rest):
            self.hook_puts[n] = self.hook_puts.get(n, 0) + 1
            return orig(p, f, n, *rest)
        srv._cmd_put = counting_put

    def _collect(self, n, deadline, what):
        got = []
        while len(got) < n:
            left = deadline - time.perf_counter()
            if left <= 0:
                raise BenchError("timeout: %d of %d %s returned (stats %s)" % (len(got), n, what, self.m.stats))
            t = self.m.wait(min(left, 5.0))
            if t is not None:
                got.append(t)
        bad = [t for t in got if not t.successful()]
        if bad:
            t = bad[0]
            raise BenchError("%d of %d %s failed; task %s: %s: %s %s" % (len(bad), n, what, t.id, t.result, t.reason,
                                                                          (t.std_output or "")[-300:]))
        self.tasks_total += n
        return got

    def _timed(self, fn):
        c0, p0 = self.m.manager_cpu_seconds, time.process_time()
        t0 = time.perf_counter()
        res = fn()
        dt = time.perf_counter() - t0
        cpu = self.m.manager_cpu_seconds - c0
        res["mgr_process_cpu_s"] = time.process_time() - p0   # I/O thread + the submitting thread
        if "seconds" not in res:
            res.update(seconds=dt, rate=res["n"] / dt)
        res["mgr_cpu_s"] = cpu
        res["mgr_cpu_s_per_1k"] = cpu / res["n"] * 1000
        return res

    def warmup(self, workloads):
        dl = time.perf_counter() + self.timeout
        for i in range(WARMUP):
            self.m.submit(self.vinehpc.PythonTask(noop, i))
        self._collect(WARMUP, dl, "warm-up tasks")
        if "W2" in workloads:
            self.w2(5, dl)
        if set(VINE_ONLY) & set(workloads):
            self.m.install_library(self.m.create_library_from_functions("bench", noop, exec_mode="direct"))
            for i in range(WARMUP):
                self.m.submit(self.call(i))
            self._collect(WARMUP, dl, "warm-up calls")

    def call(self, i):
        return self.vinehpc.FunctionCall("bench", "noop", i)

    def w1(self, make):
        n, dl = COUNTS["W1"], time.perf_counter() + self.timeout
        for i in range(n):
            self.m.submit(make(i))
        got = self._collect(n, dl, "no-op tasks")
        check_same(sorted(t.output for t in got), list(range(n)))
        return {"n": n}

    def w4(self, make):
        n = COUNTS["W4"]
        lat = []
        for i in range(n):
            t0 = time.perf_counter()
            self.m.submit(make(i))
            t = self.m.wait(self.timeout)
            lat.append(time.perf_counter() - t0)
            if t is None:
                raise BenchError("timeout: round trip %d got no task within %ss" % (i, self.timeout))
            if not t.successful() or t.output != i:
                raise BenchError("round trip %d: %s %s" % (i, t.result, t.reason))
        self.tasks_total += n
        return latency_result(lat)

    def w2(self, n, dl):
        out = tempfile.mkdtemp(prefix="w2-", dir=self.tmp)
        paths = []
        for i in range(n):
            t = self.vinehpc.Task("echo x > out.txt")
            p = os.path.join(out, "out-%d.txt" % i)
            paths.append(p)
            t.add_output(self.m.declare_file(p), "out.txt")
            self.m.submit(t)
        self._collect(n, dl, "command tasks")
        return out, paths

    def run(self, w, rep):
        make = self.call if w in VINE_ONLY else lambda i: self.vinehpc.PythonTask(noop, i)
        if w in ("W1", "F1"):
            return self._timed(lambda: self.w1(make))
        if w in ("W4", "F4"):
            return self._timed(lambda: self.w4(make))
        if w == "W2":
            box = []
            res = self._timed(lambda: (box.append(self.w2(COUNTS["W2"], time.perf_counter() + self.timeout)),
                                       {"n": COUNTS["W2"]})[1])
            out, paths = box[0]
            vals = []
            for p in paths:
                with open(p) as f:
                    vals.append(f.read())
            check_values(vals, "x\n", "output files")
            shutil.rmtree(out, ignore_errors=True)
            return res
        if w == "W3":
            path = make_input(os.path.join(self.tmp, "vine-input-%d.dat" % rep))
            n = COUNTS["W3"]
            f = self.m.declare_file(path, cache=True)

            def go():
                dl = time.perf_counter() + self.timeout
                for _ in range(n):
                    t = self.vinehpc.PythonTask(read_len, "input.dat")
                    t.add_input(f, "input.dat")
                    self.m.submit(t)
                got = self._collect(n, dl, "input-reading tasks")
                check_values([t.output for t in got], INPUT_BYTES, "tasks")
                return {"n": n}
            res = self._timed(go)
            res["transfers"] = None
            self.w3.append((f.cachename(), res))
            return res
        raise ValueError(w)

    def close(self):
        try:
            self.workers_seen = self.m.workers()
        except Exception as e:
            self.workers_seen = "unavailable: %s" % e
        self.m.close()
        self.cpu_total = self.m.manager_cpu_seconds
        self._count_transfers()

    def _count_transfers(self):
        recs = []
        try:
            with open(os.path.join(self.run_dir, "transactions.jsonl")) as fh:
                for line in fh:
                    try:
                        recs.append(json.loads(line))
                    except ValueError:
                        pass
        except OSError:
            pass
        puts = [r for r in recs if r.get("event") == "put"]
        for cn, res in self.w3:
            if puts:
                k = [r for r in puts if r.get("file") == cn]
                if not k:   # field named differently: match by size
                    k = [r for r in puts if r.get("size") == INPUT_BYTES]
                res["transfers"], res["transfers_source"] = len(k), "journal 'put' records"
                if self.hook_puts is not None:
                    res["transfers_hook"] = self.hook_puts.get(cn, 0)
            elif self.hook_puts is not None:
                res["transfers"] = self.hook_puts.get(cn, 0)
                res["transfers_source"] = "no 'put' records in the journal; counted the manager's put commands in-process"
            else:
                res["transfers_source"] = "no 'put' records in the journal and no hook: unknown"


# --------------------------------------------------------------------------- ProcessPoolExecutor
class Pool:
    name = "processpool"

    def __init__(self, tmp, timeout):
        self.tmp, self.timeout = tmp, timeout
        self.ex = cf.ProcessPoolExecutor(2)

    def _all(self, futs, what):
        done, not_done = cf.wait(futs, timeout=self.timeout)
        if not_done:
            raise BenchError("timeout: %d of %d %s not done" % (len(not_done), len(futs), what))
        return [f.result() for f in futs]

    def warmup(self, workloads):
        self._all([self.ex.submit(noop, i) for i in range(WARMUP)], "warm-up tasks")
        if "W2" in workloads:
            d = tempfile.mkdtemp(dir=self.tmp)
            self._all([self.ex.submit(shell_echo, d) for _ in range(5)], "warm-up tasks")

    def _rate(self, n, fn):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        return {"n": n, "seconds": dt, "rate": n / dt}

    def run(self, w, rep):
        n = COUNTS[w]
        if w == "W1":
            box = []
            res = self._rate(n, lambda: box.append(self._all([self.ex.submit(noop, i) for i in range(n)], "tasks")))
            check_same(sorted(box[0]), list(range(n)))
            return res
        if w == "W2":
            d = tempfile.mkdtemp(prefix="w2-", dir=self.tmp)
            box = []
            res = self._rate(n, lambda: box.append(self._all([self.ex.submit(shell_echo, d) for _ in range(n)], "tasks")))
            check_values(box[0], "x\n", "tasks")
            shutil.rmtree(d, ignore_errors=True)
            return res
        if w == "W3":
            path = make_input(os.path.join(self.tmp, "%s-input-%d.dat" % (self.name, rep)))
            box = []
            res = self._rate(n, lambda: box.append(self._all([self.ex.submit(read_len, path) for _ in range(n)], "tasks")))
            check_values(box[0], INPUT_BYTES, "tasks")
            os.unlink(path)
            return res
        if w == "W4":
            lat = []
            for i in range(n):
                t0 = time.perf_counter()
                v = self.ex.submit(noop, i).result(timeout=self.timeout)
                lat.append(time.perf_counter() - t0)
                if v != i:
                    raise BenchError("round trip %d returned %r" % (i, v))
            return latency_result(lat)
        raise ValueError(w)

    def close(self):
        self.ex.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------- Dask distributed
class Dask(Pool):
    name = "dask"

    def __init__(self, tmp, timeout):
        from distributed import Client, LocalCluster
        import distributed
        self.distributed = distributed
        self.tmp, self.timeout = tmp, timeout
        self.cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                    silence_logs=logging.ERROR)
        self.client = Client(self.cluster)
        self.client.wait_for_workers(2, timeout=60)

    # Dask: client.map (its batched submit); pure=False, or identical calls would be run once.
    def _map(self, fn, args, what):
        futs = self.client.map(fn, args, pure=False)
        try:
            self.distributed.wait(futs, timeout=self.timeout)
        except Exception as e:   # distributed raises its own TimeoutError
            raise BenchError("timeout: %s not done after %ss (%r)" % (what, self.timeout, e))
        return self.client.gather(futs)

    def warmup(self, workloads):
        self._map(noop, range(WARMUP), "warm-up tasks")
        if "W2" in workloads:
            d = tempfile.mkdtemp(dir=self.tmp)
            self._map(shell_echo, [d] * 5, "warm-up tasks")

    def run(self, w, rep):
        n = COUNTS[w]
        if w == "W1":
            box = []
            res = self._rate(n, lambda: box.append(self._map(noop, range(n), "tasks")))
            check_same(sorted(box[0]), list(range(n)))
            return res
        if w == "W2":
            d = tempfile.mkdtemp(prefix="w2-", dir=self.tmp)
            box = []
            res = self._rate(n, lambda: box.append(self._map(shell_echo, [d] * n, "tasks")))
            check_values(box[0], "x\n", "tasks")
            shutil.rmtree(d, ignore_errors=True)
            return res
        if w == "W3":
            path = make_input(os.path.join(self.tmp, "%s-input-%d.dat" % (self.name, rep)))
            box = []
            res = self._rate(n, lambda: box.append(self._map(read_len, [path] * n, "tasks")))
            check_values(box[0], INPUT_BYTES, "tasks")
            os.unlink(path)
            return res
        if w == "W4":
            lat = []
            for i in range(n):
                t0 = time.perf_counter()
                v = self.client.submit(noop, i, pure=False).result(timeout=self.timeout)
                lat.append(time.perf_counter() - t0)
                if v != i:
                    raise BenchError("round trip %d returned %r" % (i, v))
            return latency_result(lat)
        raise ValueError(w)

    def close(self):
        try:
            self.client.close(timeout=30)
        finally:
            self.cluster.close(timeout=30)


class VineTLS(Vine):
    """vinehpc with TLS between the manager and its workers (--ssl)."""
    name = "vinehpc-tls"
    ssl = True


# --------------------------------------------------------------------------- driver
def best(runs, w):
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return None
    if w in LATENCY:
        return min(ok, key=lambda r: r["median_ms"])
    return max(ok, key=lambda r: r["rate"])


def bench_system(cls, tmp, workloads, repeat, timeout):
    if not issubclass(cls, Vine):
        workloads = [w for w in workloads if w not in VINE_ONLY]
    out = {w: [] for w in workloads}
    extra = {}
    progress("%s: starting" % cls.name)
    closed = []
    s = None
    try:
        s = cls(tmp, timeout)
        s.warmup(workloads)
    except Exception as e:
        progress("%s: cannot start: %r" % (cls.name, e))
        for w in workloads:
            out[w].append({"error": "start/warm-up failed: %r" % e})
        if s is not None:
            close_system(s, extra, closed)
        return out, extra
    try:
        for w in workloads:
            for r in range(repeat):
                try:
                    res = s.run(w, r)
                    out[w].append(res)
                    progress("%s %s #%d: %s" % (cls.name, w, r + 1, fmt_run(w, res)))
                except Exception as e:
                    out[w].append({"error": "%s: %s" % (type(e).__name__, e)})
                    progress("%s %s #%d: ERROR %r -- restarting %s" % (cls.name, w, r + 1, e, cls.name))
                    try:
                        close_system(s, extra, closed)
                        s = cls(tmp, timeout)
                        s.warmup(workloads)
                    except Exception as e2:
                        progress("%s: restart failed: %r" % (cls.name, e2))
                        return out, extra
    finally:
        close_system(s, extra, closed)
    return out, extra


def bench_alternating(classes, tmp, workloads, repeat, timeout):
    """--ssl: plain and TLS vinehpc take turns, one repeat each (a fresh manager and workers each
    time), so a machine whose load changes during the benchmark weighs on both alike."""
    results = {c.name: {w: [] for w in workloads} for c in classes}
    extras = {c.name: {} for c in classes}
    for _ in range(repeat):
        for c in classes:
            out, extra = bench_system(c, tmp, workloads, 1, timeout)
            for w in workloads:
                results[c.name][w] += out[w]
            for k, v in extra.items():
                x = extras[c.name]
                if isinstance(v, list):
                    x.setdefault(k, []).extend(v)
                else:
                    x[k] = x.get(k, 0) + v
    return results, extras


def close_system(s, extra, closed):
    if s in closed:
        return
    closed.append(s)
    t0 = time.perf_counter()
    try:
        s.close()
    except Exception as e:
        progress("%s: close failed: %r" % (s.name, e))
        extra.setdefault("close_errors", []).append(repr(e))
    dt = time.perf_counter() - t0
    if dt > 5:
        progress("%s: close took %.1fs" % (s.name, dt))
    if isinstance(s, Vine):
        extra.setdefault("run_dirs", []).append(s.run_dir)
        extra["manager_cpu_s"] = extra.get("manager_cpu_s", 0.0) + (s.cpu_total or 0.0)
        extra["tasks_total"] = extra.get("tasks_total", 0) + s.tasks_total
        extra.setdefault("workers", []).append(s.workers_seen)


def fmt_run(w, r):
    if r is None:
        return "-"
    if "error" in r:
        return "ERROR"
    if w in LATENCY:
        return "%.2f ms (p90 %.2f)" % (r["median_ms"], r["p90_ms"])
    return "{:,.0f}/s".format(r["rate"])


def speed(w, r):
    if r is None or "error" in r:
        return None
    return 1.0 / r["median_ms"] if w in LATENCY else r["rate"]


def ratio(w, a, b):
    sa, sb = speed(w, a), speed(w, b)
    return None if sa is None or sb is None else sa / sb


def evaluate(w, vh, pp, dk, have_dask):
    """[(label, True/False/None)] (None: not measurable in this run)."""
    v = speed(w, vh)
    rp, rd = ratio(w, vh, pp), ratio(w, vh, dk)
    if w == "W1":
        return [(">=3000/s", None if v is None else v >= 3000),
                (">=0.4x pp", None if rp is None else rp >= 0.4),
                (">=5x dask", None if rd is None else rd >= 5)]
    if w == "W2":
        return [(">=800/s", None if v is None else v >= 800)]
    if w == "W3":
        tr = None if vh is None or "error" in vh else vh.get("transfers")
        return [(">=0.9x pp", None if rp is None else rp >= 0.9),
                ("input sent 2x", None if tr is None else tr == 2)]
    if w == "W4":
        return [("median <=1.0 ms", None if vh is None or "error" in vh else vh["median_ms"] <= 1.0)]
    if w == "F1":
        return [(">=5x TaskVine direct (%.0f/s)" % TASKVINE_DIRECT["rate"],
                 None if v is None else v >= 5 * TASKVINE_DIRECT["rate"])]
    if w == "F4":
        return [("median <=1/3 TaskVine direct (%.2f ms)" % (TASKVINE_DIRECT["median_ms"] / 3),
                 None if vh is None or "error" in vh else vh["median_ms"] <= TASKVINE_DIRECT["median_ms"] / 3)]
    return []


def verdict(checks, vh):
    if vh is None or "error" in vh:
        return "ERROR"
    miss = [l for l, ok in checks if ok is False]
    na = [l for l, ok in checks if ok is None]
    s = "PASS" if not miss else "MISS " + ", ".join(miss)
    if na:
        s += " (n/a: %s)" % ", ".join(na)
    return s


def table(rows, header):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(widths[i]) if i in (0, len(r) - 2, len(r) - 1) else str(c).rjust(widths[i])
                               for i, c in enumerate(r)).rstrip()
    out = [line(header), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workloads", default="W1,W2,W3,W4,F1,F4", help="comma-separated subset of " + ",".join(COUNTS))
    ap.add_argument("--repeat", type=int, default=1, help="run each workload K times per system, keep the best")
    ap.add_argument("--no-dask", action="store_true", help="skip Dask even if dask.distributed is importable")
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    ap.add_argument("--ssl", action="store_true",
                    help="also run vinehpc with TLS (Manager(ssl=True)) and report its cost (TLS / plain speed)")
    ap.add_argument("--timeout", type=float, default=120.0, help="bound on each workload run, seconds")
    ap.add_argument("--max-seconds", type=float, default=1800.0,
                    help="hard bound on the whole benchmark: dump tracebacks and exit")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (vinehpc run dirs)")
    args = ap.parse_args(argv)
    workloads = [w.strip().upper() for w in args.workloads.split(",") if w.strip()]
    for w in workloads:
        if w not in COUNTS:
            ap.error("unknown workload %r (choose from %s)" % (w, ",".join(COUNTS)))
    if args.repeat < 1:
        ap.error("--repeat must be at least 1, got %d" % args.repeat)
    faulthandler.dump_traceback_later(args.max_seconds, exit=True)

    have_dask = False
    dask_note = "skipped (--no-dask)"
    if not args.no_dask:
        try:
            import distributed  # noqa: F401
            have_dask = True
            dask_note = "distributed %s" % distributed.__version__
        except ImportError:
            dask_note = 'not installed (pip install "dask[distributed]")'

    tmp = tempfile.mkdtemp(prefix="vinehpc-bench-")
    results, extras = {}, {}
    try:
        if args.ssl:
            r, x = bench_alternating((Vine, VineTLS), tmp, workloads, args.repeat, args.timeout)
            results.update(r)
            extras.update(x)
        for cls in ((Vine,) if not args.ssl else ()) + (Pool,) + ((Dask,) if have_dask else ()):
            results[cls.name], extras[cls.name] = bench_system(cls, tmp, workloads, args.repeat, args.timeout)
    finally:
        if args.keep:
            progress("kept %s" % tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    faulthandler.cancel_dump_traceback_later()

    import vinehpc
    summary = []
    for w in workloads:
        vh, pp = best(results["vinehpc"][w], w), best(results["processpool"].get(w, []), w)
        dk = best(results["dask"].get(w, []), w) if have_dask else None
        checks = evaluate(w, vh, pp, dk, have_dask)
        summary.append({"workload": w, "title": TITLES[w], "n": COUNTS[w],
                        "best": {"vinehpc": vh, "processpool": pp, "dask": dk},
                        "ratio_vs_processpool": ratio(w, vh, pp), "ratio_vs_dask": ratio(w, vh, dk),
                        "checks": [{"target": l, "pass": ok} for l, ok in checks],
                        "verdict": verdict(checks, vh)})
    tls_cost = []
    if args.ssl:
        for w in workloads:
            plain, tls_run = best(results["vinehpc"][w], w), best(results["vinehpc-tls"][w], w)
            # the manager's CPU per 1,000 tasks (least of the repeats): steadier than rates on a loaded machine
            cpu = [min((x["mgr_cpu_s_per_1k"] for x in results[k][w] if "mgr_cpu_s_per_1k" in x), default=None)
                   for k in ("vinehpc", "vinehpc-tls")]
            tls_cost.append({"workload": w, "plain": plain, "tls": tls_run, "tls_over_plain": ratio(w, tls_run, plain),
                             "mgr_cpu_s_per_1k": {"plain": cpu[0], "tls": cpu[1]}})
    vx = extras.get("vinehpc", {})
    env = {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
           "vinehpc": getattr(vinehpc, "__version__", "?"), "dask": dask_note, "repeat": args.repeat,
           "input_bytes": INPUT_BYTES, "warmup_tasks": WARMUP}

    if args.json:
        json.dump({"environment": env, "summary": summary, "runs": results, "vinehpc": vx, "tls_cost": tls_cost},
                  sys.stdout, indent=1, default=str)
        print()
        return 2 if any(s["verdict"] == "ERROR" for s in summary) else 0

    header = ["workload", "vinehpc", "processpool", "dask", "vh/pp", "vh/dask", "mgr cpu s/1k", "target", "verdict"]
    rows = []
    for s in summary:
        w, b = s["workload"], s["best"]
        r = lambda x: "-" if x is None else "%.2fx" % x
        vh = b["vinehpc"]
        cpu = "-" if vh is None or "error" in vh else "%.3f" % vh["mgr_cpu_s_per_1k"]
        rows.append([s["title"], fmt_run(w, vh), fmt_run(w, b["processpool"]),
                     fmt_run(w, b["dask"]) if have_dask else "n/a",
                     r(s["ratio_vs_processpool"]), r(s["ratio_vs_dask"]), cpu,
                     "; ".join(c["target"] for c in s["checks"]), s["verdict"]])
    print("vinehpc throughput benchmark: 2 local workers x 1 core each; python %s, %s cpus, dask: %s, best of %d"
          % (env["python"], env["cpus"], dask_note, args.repeat))
    print("rates in tasks/s (W4: median round trip); ratios are vinehpc speed / peer speed (>1: vinehpc faster)")
    print()
    print(table(rows, header))
    print()
    for s in summary:
        if s["workload"] == "W3":
            vruns = [x for x in results["vinehpc"]["W3"] if "error" not in x]
            if vruns:
                print("W3 vinehpc transfers of the 50 MiB input per repeat: %s  [%s]"
                      % ([x.get("transfers") for x in vruns], vruns[0].get("transfers_source")))
                hook = [x.get("transfers_hook") for x in vruns if "transfers_hook" in x]
                if hook:
                    print("   (cross-check, manager put commands counted in-process: %s)" % hook)
    for f, w in (("F1", "W1"), ("F4", "W4")):
        sf = next((x for x in summary if x["workload"] == f), None)
        if sf is None or speed(f, sf["best"]["vinehpc"]) is None:
            continue
        fv = sf["best"]["vinehpc"]
        tv = TASKVINE_DIRECT["median_ms" if f in LATENCY else "rate"]
        vs_tv = tv / fv["median_ms"] if f in LATENCY else fv["rate"] / tv
        own = next((x["best"]["vinehpc"] for x in summary if x["workload"] == w), None)
        ours = "" if speed(w, own) is None else ", %.2fx our PythonTask %s (%s)" % (
            speed(f, fv) / speed(w, own), w, fmt_run(w, own))
        print("serverless %s: %s = %.2fx TaskVine direct (%s)%s" % (
            f, fmt_run(f, fv), vs_tv, "%.1f ms" % tv if f in LATENCY else "%.0f/s" % tv, ours))
    for c in tls_cost:
        cpu = c["mgr_cpu_s_per_1k"]
        print("TLS cost %s: plain %s, TLS %s: TLS/plain speed %s; manager CPU per 1,000 tasks %s" % (
            TITLES[c["workload"]], fmt_run(c["workload"], c["plain"]), fmt_run(c["workload"], c["tls"]),
            "-" if c["tls_over_plain"] is None else "%.2fx" % c["tls_over_plain"],
            "-" if None in cpu.values() else "%.3f s plain, %.3f s TLS (%.2fx)" % (
                cpu["plain"], cpu["tls"], cpu["tls"] / cpu["plain"])))
    if vx.get("tasks_total"):
        print("vinehpc manager I/O thread CPU: %.2f s for %d tasks incl. warm-up = %.3f s per 1,000 tasks"
              % (vx["manager_cpu_s"], vx["tasks_total"], vx["manager_cpu_s"] / vx["tasks_total"] * 1000))
    errs = [(sysname, w, x["error"]) for sysname, per in results.items() for w, xs in per.items()
            for x in xs if "error" in x]
    for sysname, w, e in errs:
        print("ERROR %s %s: %s" % (sysname, w, e))
    return 2 if errs else 0


if __name__ == "__main__":
    sys.exit(main())
