# TaskVine's Dask examples start their own workers with a Factory and pass DaskVine.get a
# checkpoint predicate over the graph and a wrapper around each key.  Written for vinehpc in
# TaskVine's style (import vinehpc as vine); asserts its own results.
from operator import mul

import vinehpc as vine

graph = {
    "a": 3,
    "b": 4,
    "ab": (mul, "a", "b"),                  # 12
    "pair": [(sum, ["ab", "a"]), "b"],      # [15, 4]
    "top": (sum, "pair"),                   # 19
}

m = vine.DaskVine(port=0)
factory = vine.Factory(manager=m)           # under `vinehpc run`: the run's workers serve m
factory.cores = 2
factory.min_workers = 1
factory.max_workers = 1
try:
    factory.colour = "blue"
except AttributeError:
    pass
else:
    raise AssertionError("a Factory option that does not exist was accepted")

seen = {}


def checkpoint(dag, key):
    seen[key] = (dag.depth_of(key), sorted(dag.get_children(key)))
    return key == "ab"          # bring this one value back to the manager as a file


def measure(key, fn, *args):
    value = fn(*args)
    return (key, type(value).__name__), value


infos = []
with factory:
    got = m.get(graph, ["top", "ab"], lazy_transfer=True, checkpoint_fn=checkpoint, wrapper=measure,
                wrapper_proc=infos.append, resources={"cores": 1})

assert list(got) == [19, 12], got
# called for each key whose value other keys need: its distance from a requested key, its inputs
assert seen == {"ab": (0, ["a", "b"]), "pair": (1, ["a", "ab", "b"]), "a": (1, []), "b": (1, [])}, seen
assert ("top", "int") in infos and ("ab", "int") in infos, infos
print("tvex_factory_dask: ok", got, sorted(infos))
m.close()
