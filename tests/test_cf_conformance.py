"""CPython's own concurrent.futures executor tests, run against vinehpc.Executor.

The tests are not copied here: they are imported from the interpreter's test package
(`test.test_concurrent_futures`: one module up to 3.11, a package from 3.12), or, when this
interpreter's test package lacks them (pyenv builds, Debian's python3 without
libpython3.X-testsuite, which tests/run.sh installs), loaded from Debian's copy in
/usr/lib/python3.X/test/.  CPYTHON_CF_TESTS=PATH (a test_concurrent_futures.py, or the package
directory) runs another version's copy instead, to compare.  Four of their generic test
classes run unchanged with one adapter, VineMixin, in place of ThreadPoolMixin/ProcessPool*Mixin:

    ExecutorTest, ExecutorShutdownTest, WaitTests, AsCompletedTests

What the adapter does, and why:
- its executor_type makes a vinehpc.Executor on ONE Manager shared by the whole module, with
  one local worker of 5 cores (the tests' worker_count), so each test does not pay for
  starting workers;
- the tests' functions and classes (mul, sleep_and_print, MyObject, ...) travel by value
  (cloudpickle.register_pickle_by_value): the workers cannot import test modules that were
  loaded from a file path;
- the three interpreter-exit tests run a `python -I -c SCRIPT` child that does
  `from concurrent.futures import VineExecutor` and imports test.test_concurrent_futures: the
  child is given one line before SCRIPT that makes both resolvable (install()), and a
  VINEHPC_RUN_DIR under /tmp.  The SCRIPT itself, and what is checked of its output, are the
  test's own.  The child's executor starts its own local worker, as a ThreadPoolExecutor
  starts its own threads.
No test is skipped or changed.
"""
from __future__ import annotations

import concurrent.futures
import importlib.util
import os
import sys
import tempfile

import cloudpickle
import pytest

import vinehpc

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NAME = "test.test_concurrent_futures"
CLASSES = ("ExecutorTest", "ExecutorShutdownTest", "WaitTests", "AsCompletedTests")
# the module of each class: one module up to 3.11; from 3.12 a package of modules
PARTS = {"ExecutorTest": "executor", "ExecutorShutdownTest": "test_shutdown", "WaitTests": "test_wait",
         "AsCompletedTests": "test_as_completed", "ExecutorMixin": "util", "BaseTestCase": "util"}
DEBIAN_COPY = "/usr/lib/python%d.%d/test/test_concurrent_futures" % sys.version_info[:2]    # .py, or a package
SOURCE = os.environ.get("CPYTHON_CF_TESTS")     # another copy (a .py file or a package directory), to compare
_shared = None      # the module's Manager (None in the interpreter-exit children: each makes its own)


def _load_from(path):
    """CPython's tests from `path` (their .py file, or their package directory), imported as NAME."""
    if os.path.isdir(path):
        spec = importlib.util.spec_from_file_location(NAME, os.path.join(path, "__init__.py"),
                                                      submodule_search_locations=[path])
    else:
        spec = importlib.util.spec_from_file_location(NAME, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[NAME] = mod
    spec.loader.exec_module(mod)
    return mod


def load_cpython_tests(source=None):
    """{name: the module defining it} for CPython's test classes: from `source`, else the interpreter's
    own test package, else Debian's copy; None when there is none."""
    mod = sys.modules.get(NAME)
    if mod is None and source:
        mod = _load_from(source)
    if mod is None:
        try:
            import test.test_concurrent_futures as mod
        except ImportError:
            found = [p for p in (DEBIAN_COPY + ".py", DEBIAN_COPY) if os.path.exists(p)]
            if not found:
                return None
            mod = _load_from(found[0])
    if hasattr(mod, "__path__"):
        return {name: importlib.import_module(NAME + "." + part) for name, part in PARTS.items()}
    return {name: mod for name in PARTS}


class VineExecutor(vinehpc.Executor):
    """vinehpc.Executor as the tests make it: executor_type(max_workers=N).  On the module's
    shared Manager under pytest; alone (an interpreter-exit child), with its own local worker
    of N cores."""

    def __init__(self, max_workers=None):
        if _shared is not None:
            super().__init__(max_workers, manager=_shared)
        else:
            super().__init__(max_workers, local_workers=1, cores_per_worker=max_workers or 2)


def install(source=None):
    """Make `from concurrent.futures import VineExecutor` and the tests' modules resolvable, and
    their functions travel by value (in this process and, through the boot line, in the
    tests' child interpreters).  Returns load_cpython_tests()."""
    where = load_cpython_tests(source)
    for mod in set((where or {}).values()):
        cloudpickle.register_pickle_by_value(mod)
    concurrent.futures.VineExecutor = VineExecutor
    return where


where = install(SOURCE)
if where is None:
    if os.environ.get("CI") == "true":
        raise RuntimeError("CPython's %s is missing: apt-get install libpython%d.%d-testsuite"
                           % ((NAME,) + sys.version_info[:2]))
    pytest.skip("CPython's %s is not installed (Debian: libpython%d.%d-testsuite)"
                % ((NAME,) + sys.version_info[:2]), allow_module_level=True)
shutdown_tests = where["ExecutorShutdownTest"]      # the module whose assert_python_ok the adapter wraps
_BOOT = ("import os, sys; sys.path[:0] = [%r, %r]; os.environ['VINEHPC_RUN_DIR'] = %r; "
         "import test_cf_conformance; test_cf_conformance.install(%r)\n")
_assert_python_ok = shutdown_tests.assert_python_ok


def _child_python_ok(*args, **env):
    """The tests' assert_python_ok('-c', SCRIPT): SCRIPT runs unchanged after the boot line."""
    assert args[0] == "-c", args
    with tempfile.TemporaryDirectory(prefix="vinehpc-cf-child-") as run_dir:
        return _assert_python_ok("-c", _BOOT % (HERE, ROOT, run_dir, SOURCE) + args[1], *args[2:], **env)


@pytest.fixture(scope="module", autouse=True)
def shared_manager(tmp_path_factory):
    global _shared
    shutdown_tests.assert_python_ok = _child_python_ok
    m = vinehpc.Manager(local_workers=1, cores_per_worker=where["ExecutorMixin"].ExecutorMixin.worker_count,
                        run_dir=str(tmp_path_factory.mktemp("cf-run")))
    m.wait_for_workers(1, timeout=60)
    _shared = m
    try:
        yield m
    finally:
        _shared = None
        shutdown_tests.assert_python_ok = _assert_python_ok
        m.close()


class VineMixin(where["ExecutorMixin"].ExecutorMixin):
    executor_type = VineExecutor


for _name in CLASSES:
    _cls = type("Vine" + _name.replace("Tests", "").replace("Test", "") + "Test",
                (VineMixin, getattr(where[_name], _name), where["BaseTestCase"].BaseTestCase), {})
    globals()[_cls.__name__] = _cls
del _name, _cls
