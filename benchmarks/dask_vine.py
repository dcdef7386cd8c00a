#!/usr/bin/env python3
"""One dask.array graph of a few hundred tasks: vinehpc.DaskVine against dask's own schedulers.

Run by hand (not a test):  python benchmarks/dask_vine.py [--size 2000] [--chunk 200] [--repeat 3]

(x + x.T).sum() of a random size x size array in chunk x chunk blocks (237 tasks by default).
Every system gets 2 cores of this machine: DaskVine as 2 local workers of 1 core (a chunk and
its transpose are often on different workers: without peer transfers such temps go through the
manager, counted as "fetch temp" in the journal) and as 1 worker of 2 cores (every temp stays
where it was made); dask's threads and processes schedulers with num_workers=2.  Each is
warmed up once (interpreters import numpy and dask), then timed `--repeat` times; the median is
reported, and the ratio dask / DaskVine (>1: DaskVine faster).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dask              # noqa: E402
import dask.array as da  # noqa: E402

import vinehpc           # noqa: E402


def graph(size, chunk):
    x = da.random.RandomState(0).random_sample((size, size), chunks=(chunk, chunk))
    return ((x + x.T).sum(),)


def timed(run, repeat):
    run()   # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=2000)
    ap.add_argument("--chunk", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    coll = graph(a.size, a.chunk)
    ntasks = len(dask.base.collections_to_expr(coll).optimize().__dask_graph__())
    want = dask.compute(*coll, scheduler="sync")
    results = {}
    for workers, cores in ((2, 1), (1, 2)):
        run_dir = tempfile.mkdtemp(prefix="dask-vine-bench-")
        m = vinehpc.DaskVine(local_workers=workers, cores_per_worker=cores, run_dir=run_dir)
        try:
            m.wait_for_workers(workers, timeout=60)

            def vine():
                got = dask.compute(*coll, scheduler=m.get)
                assert all(abs(g - w) <= 1e-9 * abs(w) for g, w in zip(got, want)), (got, want)

            t = timed(vine, a.repeat)
        finally:
            m.close()
        with open(os.path.join(run_dir, "transactions.jsonl")) as f:
            fetched = sum('"event":"fetch temp"' in line for line in f)
        shutil.rmtree(run_dir, ignore_errors=True)
        results["DaskVine %dx%d" % (workers, cores)] = t
        print("DaskVine, %d worker(s) of %d core(s): %.3f s, %.0f temps through the manager per run"
              % (workers, cores, t, fetched / (a.repeat + 1)))
    for name in ("threads", "processes"):
        results["dask " + name] = timed(lambda: dask.compute(*coll, scheduler=name, num_workers=2), a.repeat)
    print("graph: %d tasks ((x + x.T).sum(), %d^2 in %d^2 chunks), 2 cores, median of %d"
          % (ntasks, a.size, a.chunk, a.repeat))
    for name, t in results.items():
        ratios = "" if name.startswith("DaskVine") else "   " + ", ".join(
            "%s/%s = %.2f" % (name, v, t / results[v]) for v in results if v.startswith("DaskVine"))
        print("  %-16s %7.3f s%s" % (name, t, ratios))


if __name__ == "__main__":
    main()
