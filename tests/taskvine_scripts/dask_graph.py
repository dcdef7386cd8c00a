# A Dask graph through DaskVine, as a Coffea-style script does it: dask.compute(..., scheduler=m.get).
# Written for vinehpc in TaskVine's style (import vinehpc as vine); asserts its own results.
import dask
import dask.array as da
from dask import delayed

import vinehpc as vine


def inc(x):
    return x + 1


def add(x, y):
    return x + y


def divide(x, y):
    return x / y


m = vine.DaskVine(port=0)
print(f"listening on port {m.port}")

a = delayed(inc)(1)
diamond = delayed(add)(delayed(inc)(a), delayed(inc)(a))
x = da.arange(10000, chunks=1000).reshape(100, 100).rechunk(25)
total = (x + x.T).sum()

d, s = dask.compute(diamond, total, scheduler=m.get, resources={"cores": 1}, resources_mode=None,
                    lazy_transfers=True)
assert d == 6, d
assert s == total.compute(scheduler="threads"), s
print(f"diamond = {d}, (x + x.T).sum() = {s}")

try:
    dask.compute(delayed(divide)(a, 0), scheduler=m.get)
except ZeroDivisionError as e:
    print(f"a failing key raised: {e!r}")
else:
    raise AssertionError("a division by zero did not raise")
