"""A worker whose disk is full: the tasks it cannot stage run on another worker, and it gets blocked."""
import os
import subprocess
import sys

import pytest

from vinehpc import Task
from conftest import read_journal, wait_all, worker_cmd
from slurm_fixture import require


@pytest.mark.timeout(120)
def test_tasks_fail_over_from_a_worker_with_a_full_disk(make_manager, tmp_path):
    require(os.geteuid() == 0, "needs root to mount a tiny tmpfs as a worker's full disk")
    full = tmp_path / "full"
    full.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(full)], capture_output=True, text=True)
    require(r.returncode == 0, "cannot mount tmpfs: %s" % r.stderr.strip())
    procs = []
    try:
        m = make_manager(port=0, host="127.0.0.1")
        procs.append(subprocess.Popen(worker_cmd(m, "--workdir", str(full / "w"))))
        m.wait_for_workers(1, timeout=30)
        procs.append(subprocess.Popen(worker_cmd(m)))
        m.wait_for_workers(2, timeout=30)
        data = tmp_path / "input.dat"
        data.write_bytes(os.urandom(4 << 20))          # does not fit in 1 MB
        f = m.declare_file(str(data), cache=True)
        tasks = []
        for _ in range(12):
            t = Task("wc -c < in.dat")
            t.add_input(f, "in.dat")
            m.submit(t)
            tasks.append(t)
        done = wait_all(m, len(tasks), timeout=90)
        for t in done.values():
            assert t.successful() and t.std_output.strip() == str(4 << 20), (t.result, t.reason)
            assert t.attempts >= 1 and t.retries == 0
        recs = read_journal(m)
        assert any(r.get("event") == "requeued" and "No space left" in (r.get("reason") or "") for r in recs)
        assert any(r.get("event") == "host blocked" for r in recs) or \
            sum(1 for r in recs if r.get("event") == "requeued") < 3
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        subprocess.run(["umount", "-l", str(full)])
