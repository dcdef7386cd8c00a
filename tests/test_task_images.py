"""Tasks inside environment images: Manager.declare_image + task.add_environment, end to end."""
import os
import subprocess
import sys

import cloudpickle
import pytest

import vinehpc
from vinehpc import PythonTask, Task
from conftest import read_journal, wait_all
from sysimage_tools.deploy import unpack_log

cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def six_image(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("img") / "six.vimg")
    p = subprocess.run([sys.executable, "-m", "vinehpc", "sysimage", "python", "--packages", "six", "-o", out],
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr
    return out


def where_is_six():
    import sys as _sys
    import six
    return six.__file__, [p for p in _sys.path if "site-packages" in p]


@pytest.mark.timeout(120)
def test_tasks_run_inside_the_image_unpacked_once_per_node(six_image, make_manager, tmp_path, monkeypatch):
    local = tmp_path / "node-local"
    monkeypatch.setenv("VINEHPC_LOCAL_DIR", str(local))      # the workers inherit it
    m = make_manager(local_workers=2)
    img = m.declare_image(six_image)
    tasks = []
    for _ in range(6):
        t = Task("python3 -c 'import six; print(six.__file__)'")
        t.add_environment(img)
        p = PythonTask(where_is_six)
        p.add_environment(img)
        tasks += [t, p]
        m.submit(t)
        m.submit(p)
    done = wait_all(m, len(tasks), timeout=90)
    for t in done.values():
        assert t.successful(), (t.result, t.reason, t.std_output)
        where = t.std_output.strip() if isinstance(t, Task) and not isinstance(t, PythonTask) else t.output[0]
        assert where.startswith(str(local)), where            # six came from the node-local copy
        if isinstance(t, PythonTask):
            assert t.output[1] == [], "the worker's site-packages leaked into the image: %s" % t.output[1]
    assert len(unpack_log(str(local))) == 1                    # two workers, one node: one unpack
    puts = [r for r in read_journal(m, "put") if r["file"] == img.cachename()]
    assert 1 <= len(puts) <= 2 and len({r["worker"] for r in puts}) == len(puts)   # once per worker at most


def test_declare_image_refuses_what_is_not_an_image(make_manager, tmp_path):
    m = make_manager()
    bad = tmp_path / "not.vimg"
    bad.write_bytes(b"hello")
    with pytest.raises(ValueError, match="not a usable environment image"):
        m.declare_image(str(bad))
    with pytest.raises(FileNotFoundError, match="vinehpc sysimage python"):
        m.declare_image(str(tmp_path / "missing.vimg"))
    with pytest.raises(TypeError, match="declare_image"):
        Task("true").add_environment(m.declare_buffer(b"x"))
