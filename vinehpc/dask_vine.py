"""DaskVine: a Manager that runs Dask graphs, called as `dask.compute(..., scheduler=m.get)`.

Each key of the graph is one PythonTask.  A key's value stays on the worker that computed it,
as a temp file (Manager.declare_temp) that is an input of the tasks of its dependents; only the
keys the caller asked for come back to the manager, as the return values of their tasks.  The
graph is prepared with dask's own utilities (legacy graphs converted to dask's task spec, culled
to the requested keys, trivial aliases resolved, ordered by dask.order) and submitted at once in
that order: the engine holds each task until its temp inputs exist, re-runs the producer of a
temp lost with its worker, and sends a task to the worker holding its inputs when it can (without
peer transfers, a task whose inputs are on different workers gets them through the manager).

dask is imported here only, inside get(): vinehpc imports without it.
"""
from __future__ import annotations

import itertools
import os
import pickle
import queue
import shutil
import sys
import traceback

import cloudpickle

from .manager import Manager
from .task import PythonTask, RemoteTraceback, Resumable, TaskError

OUT = "out"     # a key's value in its task's sandbox (the temp its dependents read)

# TaskVine's DaskVine.get() arguments that have no effect here, accepted so that ported calls run
# (the README's DaskVine rows of the TaskVine table say why each one does nothing)
NO_EFFECT = frozenset({"low_memory_mode", "submit_per_cycle", "lib_extra_functions", "lib_resources", "lib_command",
                       "lib_modules", "hoisting_modules", "import_modules", "env_per_task", "progress_disable",
                       "progress_label", "prune_files", "prune_depth", "scheduling_mode", "reconstruct",
                       "merge_size", "worker_scheduler"})


# ---------------------------------------------------------------- on the worker
# This function and _encode travel by value (registered below): a task may run in an environment
# image whose interpreter has cloudpickle and dask but not vinehpc, and the worker's interpreters
# need not import the manager side.
def _run_key(node_blob, inputs, keep, back, wrapper=None):
    """Run one key's dask task in its sandbox: read its dependencies' values from the input files
    `inputs` [(key, file name)], call the task, write (ok, value) to OUT if `keep` (the key has
    dependents).  Returns that pickled (ok, value) if `back` (the manager asked for this key) or
    the task failed, else None.  An error is a value, (False, (exception, traceback text)): the
    dependents of a failed key pass it on without running, and the engine's retries stay for
    tasks that could not run (a raising function would raise again).
    With TaskVine's `wrapper(key, fn, *args) -> (info, value)` (fn: the key's computation, its
    inputs bound, called with no arguments), returns (ok, value or None, info) pickled, always:
    the manager hands `info` to wrapper_proc."""
    info = None
    try:
        values = {}
        for key, name in inputs:
            with open(name, "rb") as f:
                ok, v = pickle.load(f)
            if not ok:
                result = (False, v)
                break
            values[key] = v
        else:
            node = pickle.loads(node_blob)
            if wrapper is None:
                result = (True, node(values))
            else:
                info, value = wrapper(node.key, lambda: node(values))
                result = (True, value)
    except BaseException as e:  # noqa: B902 - as dask's schedulers do: the key's failure, raised by get()
        result = (False, (e, traceback.format_exc()))
    blob = _encode(result)
    if keep:
        with open(OUT, "wb") as f:
            f.write(blob)
    if wrapper is not None:
        return _encode((result[0], result[1] if back or not result[0] else None, info))
    return blob if back or not result[0] else None


def _encode(result) -> bytes:
    """(ok, value[, info]) pickled by value; a value or exception that cannot be pickled is the key's failure."""
    try:
        return cloudpickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as e:
        what = "the value" if result[0] else "the exception %r" % (result[1][0],)
        err = TypeError("%s of this key cannot be pickled: %s: %s" % (what, type(e).__name__, e))
        return cloudpickle.dumps((False, (err, traceback.format_exc())) + tuple(result[2:]),
                                 protocol=pickle.HIGHEST_PROTOCOL)


cloudpickle.register_pickle_by_value(sys.modules[__name__])


# ---------------------------------------------------------------- on the manager
def _plan(dsk, keys):
    """(graph, requested keys, dependents, order) for `keys`: dask's task spec, culled, aliases resolved."""
    try:
        from dask._task_spec import convert_legacy_graph, cull, resolve_aliases
    except ImportError as e:
        raise ImportError("DaskVine needs dask 2024.12 or later (pip install 'dask>=2024.12'): %s" % e) from None
    from collections.abc import Mapping

    from dask.core import flatten, reverse_dict
    from dask.order import order

    if not isinstance(dsk, Mapping):
        dsk = dsk.__dask_graph__()      # what dask.compute passes: an expression
    targets = list(flatten(keys)) if isinstance(keys, list) else [keys]
    if not targets:
        return {}, set(), {}, []
    dsk = convert_legacy_graph(dict(dsk))
    missing = [k for k in targets if k not in dsk]
    if missing:
        raise KeyError("%r is not a key in the graph" % (missing[0],))
    dsk = cull(dsk, targets)
    dsk = resolve_aliases(dsk, set(targets), reverse_dict({k: v.dependencies for k, v in dsk.items()}))
    deps = {k: v.dependencies for k, v in dsk.items()}
    for k, d in deps.items():
        for x in d:
            if x not in dsk:
                raise ValueError("key %r depends on %r, which is not in the graph" % (k, x))
    prio = order(dsk, dependencies=deps)
    return dsk, set(targets), reverse_dict(deps), sorted(dsk, key=prio.__getitem__)


class GraphView:
    """What checkpoint_fn(dag, key) is given, as TaskVine's DaskVineDag: get_children(key) (the keys
    it needs) and depth_of(key) (steps from the nearest requested key: those are 0, what they
    need 1, ...).  `graph` is the dask task-spec graph itself (key -> node)."""

    def __init__(self, graph, targets):
        self.graph = graph
        self._depth = {}
        level, depth = list(targets), 0
        while level:          # breadth first from the requested keys: the shortest distance
            nxt = []
            for k in level:
                if k not in self._depth:
                    self._depth[k] = depth
                    nxt.extend(graph[k].dependencies)
            level, depth = nxt, depth + 1

    def get_children(self, key):
        return set(self.graph[key].dependencies)

    def depth_of(self, key):
        return self._depth[key]


def _resources_mode(mode):
    """TaskVine's names ('min_waste', 'greedy bucketing', ...) as vinehpc's ('min-waste', ...)."""
    return mode.replace("_", "-").replace(" ", "-")


class DaskVine(Manager):
    """A Manager whose get(dsk, keys, **options) runs a Dask graph as tasks:
    `dask.compute(collection, scheduler=m.get, resources={"cores": 1})`.

    Constructed like a Manager.  Options of get() (TaskVine's names):
      resources: {"cores", "memory", "disk", "gpus"} (MB) for every task; resources_mode: a category
        mode (vinehpc's names or TaskVine's: "max", "min_waste", "greedy bucketing", ...) for each
        task category (the key's name, dask.utils.key_split);
      environment: an image (declare_image, or its path) the tasks run in; extra_files:
        {File: remote name} added to every task; env_vars: {name: value or fn(manager, task)};
      worker_transfers (and its old name lazy_transfers): True (default) keeps intermediate values
        on workers as temps; False brings every value back to the manager as a file, sent again to
        the tasks that need it (lazy_transfer: TaskVine's older name); checkpoint_fn(dag, key) -> True:
        this key's value comes back so (dag: a GraphView, TaskVine's get_children and depth_of);
      retries: attempts per task for failures other than the function raising (default 5, as in
        TaskVine; a lost worker never counts); max_pending: at most this many tasks submitted and
        not finished; verbose: print each key as it finishes; task_mode "tasks" or
        "function-calls" (both run as PythonTasks on the workers' warm interpreters).
      wrapper(key, fn) -> (info, value): runs each key on the worker (fn computes the key, its
        inputs bound); wrapper_proc(info) (default print) gets each info back on the manager.
    Other TaskVine options are accepted and have no effect (NO_EFFECT), but for init_command
    (a command prefix: NotImplementedError, as there is no command to prefix).
    A key whose function raises makes get() raise that exception, with the remote traceback as
    its __cause__; the graph's other tasks are cancelled.
    """

    _graph_ids = itertools.count(1)     # names each get()'s directory of values brought back

    def category_name(self, key) -> str:
        """The category of a key's task: the key's name without its indices and token
        (dask.utils.key_split: "sum-partial" for ("sum-partial-ab12...", 3); "Other" for a key
        it cannot split)."""
        from dask.utils import key_split        # (dask is imported only by DaskVine's users)
        return key_split(key)

    def get(self, dsk, keys, *, resources=None, resources_mode=None, environment=None, extra_files=None,
            env_vars=None, worker_transfers=True, lazy_transfers=True, checkpoint_fn=None, retries=5,
            max_pending=None, verbose=False, task_mode="tasks", wrapper=None, wrapper_proc=print,
            lazy_transfer=True, **options):
        if options.pop("init_command", None) is not None:
            raise NotImplementedError(
                "DaskVine.get(init_command=...) is not supported: keys run as PythonTasks in the workers' "
                "warm interpreters, with no shell command to prefix; give the tasks an environment image "
                "(environment=m.declare_image(...)) or variables (env_vars={...}) instead")
        unknown = set(options) - NO_EFFECT
        if unknown:
            raise TypeError("get() got an unexpected keyword argument %r" % sorted(unknown)[0])
        lazy_transfers = lazy_transfers and lazy_transfer     # lazy_transfer: TaskVine's older name
        if task_mode not in ("tasks", "function-calls"):
            raise ValueError("task_mode must be 'tasks' or 'function-calls', got %r" % (task_mode,))
        if retries is not None and (isinstance(retries, bool) or not isinstance(retries, int) or retries < 0):
            raise ValueError("retries must be a non-negative integer (attempts per task), got %r" % (retries,))
        if isinstance(environment, (str, os.PathLike)):
            environment = self.declare_image(environment)
        graph, targets, dependents, ordered = _plan(dsk, keys)
        view = GraphView(graph, targets) if checkpoint_fn is not None else None
        files_dir = None
        if not (worker_transfers and lazy_transfers) or checkpoint_fn is not None:
            files_dir = os.path.join(self.run_dir, "dask", str(next(DaskVine._graph_ids)))
            os.makedirs(files_dir, exist_ok=True)

        categories = set()
        files = {}          # key -> the File holding its value, for its dependents

        def make(i, key):
            node = graph[key]
            inputs = [(d, "in-%d" % j) for j, d in enumerate(node.dependencies)]
            keep = bool(dependents.get(key))
            t = PythonTask(_run_key, cloudpickle.dumps(node, protocol=pickle.HIGHEST_PROTOCOL), inputs, keep,
                           key in targets, wrapper)
            for d, name in inputs:
                t.add_input(files[d], name)
            if keep:
                back = files_dir is not None and (not (worker_transfers and lazy_transfers)
                                                  or checkpoint_fn(view, key))
                f = self.declare_file(os.path.join(files_dir, str(i))) if back else self.declare_temp()
                t.add_output(f, OUT)
                files[key] = f
            cat = self.category_name(key)
            t.set_category(cat).set_tag(str(key)).set_retries(max((retries or 1) - 1, 0))
            if cat not in categories:
                categories.add(cat)
                if resources_mode:
                    self.set_category_mode(cat, _resources_mode(resources_mode))
            _set_resources(t, resources)
            if environment is not None:
                t.add_environment(environment)
            for f, name in (extra_files or {}).items():
                t.add_input(f, name)
            for name, v in (env_vars or {}).items():
                t.set_env_var(name, v(self, t) if callable(v) else v)
            return t

        done = queue.SimpleQueue()      # on_done runs on the I/O thread: hand the task over, nothing more
        pending = {}                    # task id -> key
        values = {}
        missing_input = None            # a task whose input was never made: its producer's failure explains it
        limit = max_pending if max_pending and max_pending > 0 else len(ordered)
        nxt = 0
        try:
            while nxt < len(ordered) or pending:
                while nxt < len(ordered) and len(pending) < limit:
                    key = ordered[nxt]
                    pending[self.submit(make(nxt, key), on_done=done.put)] = key
                    nxt += 1
                try:
                    t = done.get(timeout=1.0)
                except queue.Empty:
                    self._check_running()
                    continue
                key = pending.pop(t.id)
                if verbose:
                    print("dask key %s: %s on %s" % (key, t.result, t.hostname), flush=True)
                if not t.successful():
                    if t.result == "input missing":
                        missing_input = missing_input or (key, t)
                        continue
                    raise TaskError("dask key %r: task %s %s: %s" % (key, t.id, t.result, t.reason)) from t.exception
                if t.output is None:
                    continue
                try:
                    ok, value, *info = pickle.loads(t.output)
                except Exception as e:
                    raise TaskError("dask key %r: its value cannot be unpickled here: %s: %s"
                                    % (key, type(e).__name__, e)) from e
                if info and ok and wrapper_proc is not None:
                    wrapper_proc(info[0])
                if info and ok and key not in targets:
                    continue
                if not ok:
                    exc, tb = value
                    exc.__cause__ = RemoteTraceback("\n[dask key %r: task %s on worker %s, host %s]\n%s"
                                                    % (key, t.id, t.worker, t.hostname, tb))
                    raise exc
                values[key] = value
            if missing_input is not None:
                key, t = missing_input
                raise TaskError("dask key %r: task %s %s: %s" % (key, t.id, t.result, t.reason))
        finally:
            for tid in pending:
                self.cancel(tid)
        if files_dir is not None:
            shutil.rmtree(files_dir, ignore_errors=True)
        from dask.local import nested_get
        return nested_get(keys, values)

    __call__ = get

    def _check_running(self):
        """get() waits on its own queue: a manager that stopped will never fill it."""
        if self.error is not None:
            raise RuntimeError("the manager's I/O thread failed: %r" % (self.error,)) from self.error
        if self.drained:
            raise Resumable("the manager stopped for the walltime before the dask graph finished")
        if self.closed:
            raise RuntimeError("the manager was closed before the dask graph finished")


def _set_resources(t, resources):
    if not resources:
        return
    for name, value in resources.items():
        setter = {"cores": t.set_cores, "memory": t.set_memory, "disk": t.set_disk, "gpus": t.set_gpus}.get(name)
        if setter is None:
            raise ValueError("resources: %r is not one of cores, memory, disk, gpus" % (name,))
        setter(value)
