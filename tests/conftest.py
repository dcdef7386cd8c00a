"""Shared fixtures for end-to-end tests: real manager, real worker processes, real TCP.

Every wait here has a deadline; when one expires the test fails with the manager's stats,
the journal's tail and the tracebacks of this process's threads (habit 7).
"""
from __future__ import annotations

import faulthandler
import io
import json
import os
import sys
import time

import psutil
import pytest

import vinehpc
from vinehpc import journal as _journal

pytest_plugins = ["slurm_fixture"]      # registered here, before any test module imports it (require())

# Every "node" of our test bed is this one host: managers are reached on loopback, and no test
# connects to this machine's other addresses (only loopback and our own namespaces are targets).
os.environ.setdefault("VINEHPC_MANAGER_HOST", "127.0.0.1")


# ------------------------------------------------------------------ journal
def journal_path(m_or_dir) -> str:
    run_dir = m_or_dir.run_dir if hasattr(m_or_dir, "run_dir") else os.fspath(m_or_dir)
    return os.path.join(run_dir, "transactions.jsonl")


def read_journal(m_or_dir, event=None) -> list:
    """The run's transactions (a Manager or a run directory); only `event` records if given.

    The manager's I/O thread flushes the journal after every loop turn, so records of
    anything that already happened are on disk."""
    path = journal_path(m_or_dir)
    if not os.path.exists(path):
        return []
    recs = _journal.read(path)
    if event is not None:
        recs = [r for r in recs if r.get("event") == event]
    return recs


def journal_tail(m_or_dir, n=40) -> str:
    try:
        recs = read_journal(m_or_dir)
    except OSError as e:
        return "(cannot read the journal: %s)" % e
    return "\n".join(json.dumps(r, default=str) for r in recs[-n:]) or "(journal empty)"


def _thread_dump() -> str:
    buf = io.StringIO()
    try:
        # faulthandler needs a real fd: go through a temporary file
        import tempfile
        with tempfile.TemporaryFile("w+") as f:
            faulthandler.dump_traceback(f, all_threads=True)
            f.seek(0)
            buf.write(f.read())
    except Exception as e:   # pragma: no cover - diagnostics only
        buf.write("(no thread dump: %r)" % e)
    return buf.getvalue()


def diagnose(m, what: str) -> str:
    try:
        stats = m.stats
    except Exception as e:
        stats = "(stats unavailable: %r)" % e
    return ("%s\nmanager stats: %s\n--- journal tail (%s) ---\n%s\n--- threads ---\n%s"
            % (what, stats, journal_path(m), journal_tail(m), _thread_dump()))


# ------------------------------------------------------------------ waiting
def wait_all(m, n: int, timeout: float) -> dict:
    """Collect `n` finished tasks from m.wait() within `timeout` seconds -> {id: task}.

    Fails if an id comes back twice, or with a diagnosis if the deadline passes."""
    deadline = time.monotonic() + timeout
    got = {}
    while len(got) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(diagnose(m, "timeout: %d of %d tasks returned after %.0f s" % (len(got), n, timeout)),
                        pytrace=False)
        t = m.wait(min(left, 5.0))
        if t is None:
            continue
        assert t.id not in got, "task %s returned twice by wait()" % t.id
        got[t.id] = t
    return got


def poll(cond, timeout: float, what: str, interval: float = 0.02, m=None):
    """Wait until cond() is truthy (returns its value); fail after `timeout` s naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            msg = "timeout after %.0f s waiting for %s" % (timeout, what)
            pytest.fail(diagnose(m, msg) if m is not None else msg, pytrace=False)
        time.sleep(interval)


# ------------------------------------------------------------------ processes
def process_tree(pids) -> list:
    """psutil.Process objects for `pids` and all their descendants that exist now.

    Keep the objects (not the numbers): is_running() compares the creation time, so a
    recycled pid is never mistaken for a survivor."""
    procs = {}
    for pid in pids:
        try:
            p = pid if isinstance(pid, psutil.Process) else psutil.Process(pid)
            procs[p.pid] = p
            for c in p.children(recursive=True):
                procs[c.pid] = c
        except psutil.NoSuchProcess:
            pass
    return list(procs.values())


def tree_running(pids, name: str, count: int = 1):
    """The process tree of `pids` once it holds `count` processes called `name`, else None."""
    tree = process_tree(pids)
    try:
        n = sum(1 for p in tree if p.name() == name)
    except psutil.NoSuchProcess:
        return None
    return tree if n >= count else None


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def assert_no_survivors(procs, timeout: float = 10.0, what: str = "processes") -> None:
    """Every process in `procs` (psutil.Process objects or pids) is gone within `timeout`.

    Zombies count as gone (their parent has yet to reap them).  Survivors are killed
    after the check so one failing test does not leak into the next, then reported."""
    procs = [p if isinstance(p, psutil.Process) else _proc_or_none(p) for p in procs]
    procs = [p for p in procs if p is not None]
    deadline = time.monotonic() + timeout
    alive = [p for p in procs if _alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if _alive(p)]
    if alive:
        desc = []
        for p in alive:
            try:
                desc.append("%d %s %s" % (p.pid, p.status(), " ".join(p.cmdline())[:200]))
            except psutil.Error:
                desc.append("%d (vanished)" % p.pid)
            try:
                p.kill()
            except psutil.Error:
                pass
        pytest.fail("%d %s still running %.0f s later:\n%s" % (len(alive), what, timeout, "\n".join(desc)),
                    pytrace=False)


def _proc_or_none(pid):
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


# ------------------------------------------------------------------ managers
def close_and_check(m) -> list:
    """Close m; its local workers and everything they started must then exit.
    Returns the complete journal (after close every record is on disk)."""
    tree = process_tree(m._local.pids()) if m._local is not None and not m._closed else []
    m.close()
    assert_no_survivors(tree, timeout=15, what="worker processes (or their children) after Manager.close()")
    return read_journal(m)


@pytest.fixture
def make_manager(tmp_path):
    """Factory for Managers that are always closed (and whose local workers must then exit)."""
    made = []

    def make(**kw):
        kw.setdefault("run_dir", str(tmp_path / ("run%d" % len(made))))
        m = vinehpc.Manager(**kw)
        made.append(m)
        return m

    yield make
    for m in made:
        close_and_check(m)


@pytest.fixture
def manager(make_manager):
    """A Manager with 2 local workers, both connected."""
    m = make_manager(local_workers=2)
    try:
        m.wait_for_workers(2, timeout=30)
    except TimeoutError as e:
        pytest.fail(diagnose(m, str(e)), pytrace=False)
    return m


def worker_cmd(m, *extra, cores=1):
    """argv of a standalone `vinehpc worker` for manager m (as typed in another shell)."""
    return [sys.executable, "-m", "vinehpc", "worker", "127.0.0.1:%d" % m.port, "--secret-file", m.secret_file,
            "--cores", str(cores), "--no-reconnect", "--connect-timeout", "20", *extra]
