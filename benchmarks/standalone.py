"""Standalone `vinehpc worker` processes for a benchmark's Manager (per_task_cpu.py, hops.py):
the workers are processes of their own, as in a pilot, not the Manager's local ones."""
import contextlib
import os
import subprocess
import sys


@contextlib.contextmanager
def workers(m, n, env=None, timeout=60):
    """Start n single-core workers connected to Manager m and wait until they joined; yields their
    Popen objects.  On exit m is closed (the workers are told to exit) and each worker is waited
    for, killed if it has not exited within 30 s.  `env`: their environment (default ours), to
    which the run's secret is added."""
    env = dict(os.environ if env is None else env, VINEHPC_SECRET=m.secret)
    ws = [subprocess.Popen([sys.executable, "-m", "vinehpc", "worker", "127.0.0.1:%d" % m.port, "--cores", "1",
                            "--no-reconnect"], env=env, stdin=subprocess.DEVNULL) for _ in range(n)]
    try:
        m.wait_for_workers(n, timeout)
        yield ws
    finally:
        m.close()
        for w in ws:
            try:
                w.wait(30)
            except subprocess.TimeoutExpired:
                w.kill()
