"""One Settings read from the environment (vinehpc/config.py), and the public Manager methods
launchers and the probe use instead of the manager's internals (submit(worker=, on_done=),
closed, workers(), stats)."""
from __future__ import annotations

import os
import threading

import pytest

from vinehpc import PythonTask
from vinehpc.config import Settings, Slurm
from vinehpc.local import worker_command


def test_settings_defaults_outside_any_run():
    s = Settings.from_env({})
    assert s.secret is None and s.worker_dir is None and s.manager_host is None
    assert (s.keepalive_interval, s.keepalive_timeout, s.grace, s.mpi_init_timeout) == (5.0, 30.0, 60.0, 300.0)
    assert s.progress == "auto" and s.run_dir_root == os.path.join(os.getcwd(), "vine-run-info")
    assert s.slurm == Slurm()


def test_settings_read_every_variable():
    s = Settings.from_env({"VINEHPC_SECRET": "x", "VINEHPC_RUN_DIR": "/r", "VINEHPC_KEEPALIVE_INTERVAL": "2",
                           "VINEHPC_KEEPALIVE_TIMEOUT": "9.5", "VINEHPC_PROGRESS": "never",
                           "VINEHPC_WORKER_DIR": "/w", "VINEHPC_MPI_INIT_TIMEOUT": "0", "VINEHPC_GRACE": "12",
                           "VINEHPC_MANAGER_HOST": "10.0.0.1", "SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "j",
                           "SLURMD_NODENAME": "n3", "SLURM_CPUS_PER_TASK": "4", "SLURM_MEM_PER_NODE": "8000",
                           "SLURM_JOB_CPUS_PER_NODE": "6(x2),4"})
    assert (s.secret, s.run_dir_root, s.worker_dir, s.manager_host, s.progress) == ("x", "/r", "/w", "10.0.0.1",
                                                                                    "never")
    assert (s.keepalive_interval, s.keepalive_timeout, s.mpi_init_timeout, s.grace) == (2.0, 9.5, 0.0, 12.0)
    assert s.slurm == Slurm(job_id="7", job_name="j", node_name="n3", cpus_per_task=4, job_cpus_per_node=6,
                            mem_per_node=8000)
    with pytest.raises(Exception):
        s.grace = 1.0        # frozen: passed down, never changed on the way


@pytest.mark.parametrize("name", ["VINEHPC_KEEPALIVE_INTERVAL", "VINEHPC_GRACE", "VINEHPC_MPI_INIT_TIMEOUT"])
def test_settings_refuse_a_malformed_number(name):
    with pytest.raises(ValueError, match=name):
        Settings.from_env({name: "soon"})


def test_worker_command_line():
    local = worker_command("127.0.0.1:9", cores=2, connect_timeout=30, reconnect=False, memory=100)
    assert local[1:] == ["-m", "vinehpc", "worker", "127.0.0.1:9", "--cores", "2", "--connect-timeout", "30",
                         "--no-reconnect", "--memory", "100"]
    pilot = worker_command("h:9", cores=1, connect_timeout=300.0, exit_on_refused=True, image="/i.vimg")
    assert pilot[4:] == ["h:9", "--cores", "1", "--connect-timeout", "300.0", "--exit-on-refused",
                         "--image", "/i.vimg"]


def test_manager_takes_the_given_settings(make_manager, tmp_path):
    s = Settings.from_env({"VINEHPC_SECRET": "given-secret", "VINEHPC_KEEPALIVE_INTERVAL": "3"})
    m = make_manager(port=0, settings=s)
    assert m.settings is s and m.secret == "given-secret"
    assert not m.closed
    m.close()
    assert m.closed


def test_submit_pinned_to_a_worker_with_a_callback(manager):
    """submit(task, worker=ID): runs only there; on_done: comes back through the callback, not wait()."""
    ids = [w["id"] for w in manager.workers()]
    assert len(ids) == 2
    got, lock, all_back = [], threading.Lock(), threading.Event()

    def on_done(task):
        with lock:
            got.append(task)
            if len(got) == 6:
                all_back.set()
    for _ in range(6):
        manager.submit(PythonTask(os.getpid), worker=ids[1], on_done=on_done)
    assert all_back.wait(60), "%d of 6 pinned tasks came back" % len(got)
    assert {t.worker for t in got} == {ids[1]} and all(t.result == "success" for t in got)
    assert manager.empty() and manager.wait(0.1) is None      # callbacks' tasks never reach wait()
