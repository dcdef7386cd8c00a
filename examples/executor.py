#!/usr/bin/env python3
"""vinehpc.Executor is a concurrent.futures.Executor backed by vinehpc workers.

    vinehpc run examples/executor.py
"""
import sys
from concurrent.futures import as_completed

import vinehpc


def collatz_steps(n):
    """Number of Collatz steps for n to reach 1."""
    steps = 0
    while n != 1:
        n = 3 * n + 1 if n % 2 else n // 2
        steps += 1
    return steps


def checked_sqrt(x):
    if x < 0:
        raise ValueError(f"cannot take sqrt of {x}")
    return x ** 0.5


with vinehpc.Executor() as ex:
    futures = {ex.submit(collatz_steps, n): n for n in range(1, 31)}
    for fut in as_completed(futures, timeout=300):  # in completion order
        print(f"collatz({futures[fut]:2d}) = {fut.result()}")

    # A remote exception is re-raised locally; the remote traceback is its __cause__.
    bad = ex.submit(checked_sqrt, -1.0)
    try:
        bad.result(timeout=300)
        sys.exit("expected a ValueError")
    except ValueError as exc:
        print("re-raised locally:", exc)
        print("remote cause:", repr(exc.__cause__))
