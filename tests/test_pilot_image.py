"""`vinehpc pilot --image`: the image is read once by rank 0, broadcast over MPI, unpacked once per
node, and every task runs inside it (mpiexec, no Slurm)."""
import os
import subprocess
import sys
import textwrap

import pytest

pytest_plugins = ["slurm_fixture"]

SCRIPT = textwrap.dedent("""
    from vinehpc import Manager, Task, PythonTask
    def where():
        import six
        return six.__file__
    m = Manager()
    for i in range(4):
        m.submit(PythonTask(where))
        m.submit(Task("python3 -c 'import six; print(six.__file__)'"))
    n = 0
    while not m.empty():
        t = m.wait(30)
        assert t.successful(), (t.result, t.reason, t.std_output)
        print("six from", t.output if isinstance(t, PythonTask) else t.std_output.strip())
        n += 1
    print("tasks", n)
""")


@pytest.mark.timeout(300)
def test_pilot_image_is_broadcast_and_unpacked_once_per_node(mpi, tmp_path):
    image = tmp_path / "six.vimg"
    p = subprocess.run([sys.executable, "-m", "vinehpc", "sysimage", "python", "--packages", "six", "-o", str(image)],
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr
    (tmp_path / "job.py").write_text(SCRIPT)
    local = tmp_path / "node-local"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI", "PMIX"))}
    env["VINEHPC_LOCAL_DIR"] = str(local)
    p = subprocess.run([mpi, "-n", "3", sys.executable, "-m", "vinehpc", "pilot", "--image", str(image), "job.py"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = [line for line in p.stdout.splitlines() if line.startswith("six from ")]
    assert len(lines) == 8 and "tasks 8" in p.stdout
    assert all(line[len("six from "):].startswith(str(local)) for line in lines), lines
    from sysimage_tools.deploy import unpack_log
    assert len(unpack_log(str(local))) == 1          # three ranks, one node: one unpack
