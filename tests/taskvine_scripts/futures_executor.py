#!/usr/bin/env python3
"""TaskVine's FuturesExecutor, as a TaskVine user writes it (our own script, in TaskVine's style).

    python3 -m vinehpc run -n 2 tests/taskvine_scripts/futures_executor.py
"""
import concurrent.futures

import vinehpc as vine


def my_sum(x, y):
    return x + y


def my_mul(x, y):
    return x * y


def fails(x):
    raise ValueError("bad input %r" % (x,))


def main():
    ex = vine.FuturesExecutor(port=[9123, 9129], manager_name="futures-executor-script", factory=False)

    # futures passed as arguments are dependencies: c waits for a and b and gets their values
    a = ex.submit(my_sum, 3, 4)
    b = ex.submit(my_sum, 5, 2)
    c = ex.submit(my_sum, a, b)
    assert c.result(timeout=60) == 14, c.result()

    # a task to tailor before submitting
    t = ex.future_task(my_mul, c, 3)
    t.set_cores(1)
    t.set_tag("tailored")
    f = ex.submit(t)
    assert f.result(timeout=60) == 42

    # a library function call (runs as a task of that function until serverless libraries land)
    lib = ex.create_library_from_functions("test-library", my_sum)
    ex.install_library(lib)
    g = ex.submit(ex.future_funcall("test-library", "my_sum", 7, f))
    assert g.result(timeout=60) == 49

    # TaskVine's abstractions, each a future
    assert ex.map(my_sum, [(1, 2), (3, 4), (5, 6)], chunk_size=2).result(timeout=60) == [3, 7, 11]
    assert ex.reduce(my_mul, [1, 2, 3, 4, 5], chunk_size=2).result(timeout=60) == 120
    table = ex.allpairs(my_mul, [1, 2, 3], [10, 20], chunk_size=4).result(timeout=60)
    assert table == [[10, 20, 30], [20, 40, 60]], table

    # the concurrent.futures side: wait, as_completed, a remote exception re-raised as itself
    fs = [ex.submit(my_mul, i, i) for i in range(10)]
    done, not_done = concurrent.futures.wait(fs, timeout=60)
    assert not not_done and sorted(x.result() for x in done) == [i * i for i in range(10)]
    bad = ex.submit(fails, 1)
    try:
        bad.result(timeout=60)
        raise SystemExit("expected a ValueError")
    except ValueError as e:
        assert "bad input 1" in str(e)
    # a failed dependency fails the calls that need it
    dep = ex.submit(my_sum, bad, 1)
    assert isinstance(dep.exception(timeout=60), ValueError)

    ex.shutdown()
    print("futures executor ok")


if __name__ == "__main__":
    main()
