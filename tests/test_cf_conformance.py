"""CPython's own concurrent.futures executor tests, run against vinehpc.Executor.

The tests are not copied here: they are imported from the interpreter's test package
(`test.test_concurrent_futures`, 3.11's single-file layout), or, when this interpreter's test
package lacks them (pyenv builds, Debian's python3 without libpython3.X-testsuite), loaded
from Debian's copy /usr/lib/python3.X/test/test_concurrent_futures.py (tests/run.sh installs
libpython3.11-testsuite).  Four of its generic test classes run unchanged with one adapter,
VineMixin, in place of ThreadPoolMixin/ProcessPool*Mixin:

    ExecutorTest, ExecutorShutdownTest, WaitTests, AsCompletedTests

What the adapter does, and why:
- its executor_type makes a vinehpc.Executor on ONE Manager shared by the whole module, with
  one local worker of 5 cores (the tests' worker_count), so each test does not pay for
  starting workers;
- the test module's functions and classes (mul, sleep_and_print, MyObject, ...) travel by
  value (cloudpickle.register_pickle_by_value): the workers cannot import a test module
  that was loaded from a file path;
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
import unittest

import cloudpickle
import pytest

import vinehpc

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NAME = "test.test_concurrent_futures"
CLASSES = ("ExecutorTest", "ExecutorShutdownTest", "WaitTests", "AsCompletedTests")
DEBIAN_COPY = "/usr/lib/python%d.%d/test/test_concurrent_futures.py" % sys.version_info[:2]
_shared = None      # the module's Manager (None in the interpreter-exit children: each makes its own)


def load_cpython_tests():
    """CPython's test module, imported, or loaded from Debian's copy; None when neither exists."""
    try:
        import test.test_concurrent_futures as mod
        if all(hasattr(mod, c) for c in CLASSES):
            return mod
    except ImportError:
        pass
    if not os.path.isfile(DEBIAN_COPY):
        return None
    spec = importlib.util.spec_from_file_location(NAME, DEBIAN_COPY)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[NAME] = mod
    spec.loader.exec_module(mod)
    return mod


class VineExecutor(vinehpc.Executor):
    """vinehpc.Executor as the tests make it: executor_type(max_workers=N).  On the module's
    shared Manager under pytest; alone (an interpreter-exit child), with its own local worker
    of N cores."""

    def __init__(self, max_workers=None):
        if _shared is not None:
            super().__init__(max_workers, manager=_shared)
        else:
            super().__init__(max_workers, local_workers=1, cores_per_worker=max_workers or 2)


def install():
    """Make `from concurrent.futures import VineExecutor` and the test module resolvable, and the
    test module's functions travel by value (this process and, through the boot line, the
    tests' child interpreters)."""
    mod = sys.modules.get(NAME) or load_cpython_tests()
    if mod is not None:
        cloudpickle.register_pickle_by_value(mod)
    concurrent.futures.VineExecutor = VineExecutor
    return mod


cpython = install()
if cpython is None:
    if os.environ.get("CI") == "true":
        raise RuntimeError("CPython's %s is missing: apt-get install libpython%d.%d-testsuite"
                           % ((NAME,) + sys.version_info[:2]))
    pytest.skip("CPython's %s is not installed (Debian: libpython%d.%d-testsuite)"
                % ((NAME,) + sys.version_info[:2]), allow_module_level=True)

_BOOT = ("import os, sys; sys.path[:0] = [%r, %r]; os.environ['VINEHPC_RUN_DIR'] = %r; "
         "import test_cf_conformance; test_cf_conformance.install()\n")
_assert_python_ok = cpython.assert_python_ok


def _child_python_ok(*args, **env):
    """The tests' assert_python_ok('-c', SCRIPT): SCRIPT runs unchanged after the boot line."""
    assert args[0] == "-c", args
    with tempfile.TemporaryDirectory(prefix="vinehpc-cf-child-") as run_dir:
        return _assert_python_ok("-c", _BOOT % (HERE, ROOT, run_dir) + args[1], *args[2:], **env)


@pytest.fixture(scope="module", autouse=True)
def shared_manager(tmp_path_factory):
    global _shared
    cpython.assert_python_ok = _child_python_ok
    m = vinehpc.Manager(local_workers=1, cores_per_worker=cpython.ExecutorMixin.worker_count,
                        run_dir=str(tmp_path_factory.mktemp("cf-run")))
    m.wait_for_workers(1, timeout=60)
    _shared = m
    try:
        yield m
    finally:
        _shared = None
        cpython.assert_python_ok = _assert_python_ok
        m.close()


class VineMixin(cpython.ExecutorMixin):
    executor_type = VineExecutor


def _case(base):
    name = "Vine" + base.__name__.replace("Tests", "").replace("Test", "") + "Test"
    return type(name, (VineMixin, base, cpython.BaseTestCase), {})


for _base in CLASSES:
    _cls = _case(getattr(cpython, _base))
    globals()[_cls.__name__] = _cls
del _base, _cls
assert issubclass(VineExecutorTest, unittest.TestCase)     # noqa: F821 - made just above
