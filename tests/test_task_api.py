"""Task-building validation (manager side) and the worker's path/cache guards."""
import io
import os
import tarfile
import threading

import pytest

from vinehpc.file import Buffer, File, Temp
from vinehpc.task import PythonTask, Task, check_remote_name
from vinehpc.worker.cache import Cache, check_cachename
from vinehpc.worker.sandbox import Sandbox, SandboxError, inside


# ---------------------------------------------------------------- remote names
@pytest.mark.parametrize("name", ["..", "../x", "a/..", "a/../b", "/abs", "/etc/passwd", "a\0b", "",
                                  "a//b", ".", "a/.", "a/", None, 3])
def test_bad_remote_name_raises(name):
    with pytest.raises(ValueError):
        check_remote_name(name)


@pytest.mark.parametrize("name", ["a", "in.txt", "dir/sub/file", ".hidden", "a..b", "..a"])
def test_good_remote_name_accepted(name):
    assert check_remote_name(name) == name


def test_add_input_validates_remote_name():
    with pytest.raises(ValueError, match="absolute"):
        Task("cat x").add_input(Buffer(b"x"), "/etc/x")


def test_add_output_validates_remote_name():
    with pytest.raises(ValueError, match=r"'\.\.'"):
        Task("true").add_output(Temp(), "../out")


@pytest.mark.parametrize("name", ["./a", "a/./b"])
def test_remote_name_with_dot_component_raises(name, tmp_path):
    # the manager must refuse what every worker will refuse
    with pytest.raises(SandboxError):
        inside(str(tmp_path), name)
    with pytest.raises(ValueError):
        check_remote_name(name)


# ---------------------------------------------------------------- resources and arguments
def test_set_cores_zero_message():
    with pytest.raises(ValueError) as e:
        Task("true").set_cores(0)
    assert str(e.value) == "cores must be a positive integer, got 0"


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_set_cores_rejects_non_positive_integers(bad):
    with pytest.raises(ValueError, match="cores must be a positive integer"):
        Task("true").set_cores(bad)


@pytest.mark.parametrize("setter, bad", [("set_memory", 0), ("set_disk", -5), ("set_gpus", -1),
                                         ("set_retries", -1), ("set_time_max", 0), ("set_category", "")])
def test_other_setters_reject_bad_values(setter, bad):
    with pytest.raises(ValueError):
        getattr(Task("true"), setter)(bad)


def test_task_without_command_refused_at_check():
    with pytest.raises(ValueError, match="no command"):
        Task()._check()


def test_task_command_must_be_string():
    with pytest.raises(TypeError, match="command must be a string"):
        Task(["ls", "-l"])


def uses_a_lock(lock):
    return lock


def test_python_task_unpicklable_argument_names_function():
    t = PythonTask(uses_a_lock, threading.Lock())     # building is fine
    with pytest.raises(TypeError) as e:
        t._check()
    assert "uses_a_lock" in str(e.value) and "pickled" in str(e.value)


def test_python_task_unpicklable_keyword_argument():
    t = PythonTask(uses_a_lock, lock=threading.Lock())
    with pytest.raises(TypeError, match="uses_a_lock"):
        t._check()


def test_python_task_needs_callable():
    with pytest.raises(TypeError, match="callable"):
        PythonTask(42)


def test_python_task_check_pickles_function_and_args():
    t = PythonTask(divmod, 7, 2)
    t._check()
    assert t._fid.startswith("fn-") and t._fbytes and t._abytes


# ---------------------------------------------------------------- inputs
def test_add_input_missing_file_names_the_path(tmp_path):
    p = str(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError) as e:
        Task("cat in").add_input(File(p), "in")
    assert p in str(e.value)


def test_add_input_of_produced_file_may_not_exist_yet(tmp_path):
    f = File(str(tmp_path / "later.txt"))
    f.producer = 1                                  # an earlier task's output
    t = Task("cat in").add_input(f, "in")
    assert t.inputs == [(f, "in")]


def test_add_input_needs_a_file_object():
    with pytest.raises(TypeError, match="declare"):
        Task("cat in").add_input("/etc/passwd", "in")


def test_add_output_refuses_buffers():
    with pytest.raises(ValueError, match="outputs must be"):
        Task("true").add_output(Buffer(b"x"), "out")


def test_file_cachename_follows_content(tmp_path):
    p = tmp_path / "f"
    p.write_text("one")
    f = File(str(p))
    n1 = f.cachename()
    p.write_text("two!")
    assert f.cachename() != n1 and f.size() == 4


def test_cache_level_validation():
    with pytest.raises(ValueError, match="cache must be"):
        File("/x", cache="sometimes")


def test_cache_forever_is_the_workers_level():
    # TaskVine's "forever" (beyond the worker's life): a vinehpc cache ends with its worker
    assert File("/x", cache="forever").cache == "worker"
    assert File("/x", cache="always").cache == "worker"     # TaskVine's older name (its blast example)


# ---------------------------------------------------------------- worker sandbox
@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../x", "a/../b", "./a", "", "a\0b",
                                  "a//b", "."])
def test_inside_refuses_escapes(tmp_path, name):
    with pytest.raises(SandboxError):
        inside(str(tmp_path), name)


def test_inside_accepts_plain_paths(tmp_path):
    assert inside(str(tmp_path), "a/b.txt") == os.path.join(str(tmp_path), "a/b.txt")


def test_inside_refuses_symlinked_dir_pointing_outside(tmp_path):
    root, outside = tmp_path / "sandbox", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    os.symlink(str(outside), str(root / "d"))
    with pytest.raises(SandboxError, match="outside"):
        inside(str(root), "d/x")
    with pytest.raises(SandboxError, match="outside"):
        inside(str(root), "d/deeper/x")


def test_inside_accepts_symlinked_dir_inside(tmp_path):
    root = tmp_path / "sandbox"
    (root / "real").mkdir(parents=True)
    os.symlink("real", str(root / "alias"))
    assert inside(str(root), "alias/x") == os.path.join(str(root), "alias/x")


def test_inside_works_when_sandbox_path_is_a_symlink(tmp_path):
    (tmp_path / "real").mkdir()
    os.symlink(str(tmp_path / "real"), str(tmp_path / "link"))
    assert inside(str(tmp_path / "link"), "x").endswith("link/x")


def test_sandbox_link_refuses_escape_through_symlinked_dir(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    sb = Sandbox(str(tmp_path / "work"), 1)
    os.symlink(str(outside), os.path.join(sb.path, "d"))
    with pytest.raises(SandboxError):
        sb.link(str(tmp_path / "src"), "d/x")
    assert os.listdir(str(outside)) == []


def test_sandbox_link_makes_parent_dirs(tmp_path):
    src = tmp_path / "src"
    src.write_text("x")
    sb = Sandbox(str(tmp_path / "work"), 2)
    sb.link(str(src), "a/b/in.txt")
    with open(os.path.join(sb.path, "a/b/in.txt")) as f:
        assert f.read() == "x"


# ---------------------------------------------------------------- worker cache
def _tar(members) -> bytes:
    """members: [(name, bytes) for regular files, or (name, ('link', target)) for symlinks]"""
    bio = io.BytesIO()
    with tarfile.open(fileobj=bio, mode="w") as tar:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            if isinstance(data, tuple):
                ti.type, ti.linkname = tarfile.SYMTYPE, data[1]
                tar.addfile(ti)
            else:
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
    return bio.getvalue()


def _snapshot(root):
    out = set()
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            out.add(os.path.relpath(os.path.join(d, n), root))
    return out


def test_cache_tar_with_dotdot_member_writes_nothing_outside(tmp_path):
    cache_root = tmp_path / "cache"
    cache = Cache(str(cache_root))
    before = _snapshot(str(tmp_path))
    data = _tar([("ok.txt", b"fine"), ("../evil", b"pwned"), ("../../evil2", b"pwned")])
    with pytest.raises(Exception) as e:
        cache.put_chunk("dir-abc", data, True, "tar")
    assert isinstance(e.value, (tarfile.TarError, OSError))
    assert not (tmp_path / "evil").exists() and not (tmp_path / "evil2").exists()
    assert not (cache_root / "evil").exists()
    new = {p for p in _snapshot(str(tmp_path)) - before if not p.startswith("cache" + os.sep + ".")}
    assert new == set(), new                         # only hidden scratch inside the cache
    assert not os.path.lexists(cache.path("dir-abc"))


def test_cache_tar_with_symlink_escape_refused(tmp_path):
    cache_root = tmp_path / "cache"
    cache = Cache(str(cache_root))
    data = _tar([("ln", ("link", "../../..")), ("ln/evil", b"pwned")])
    with pytest.raises(Exception):
        cache.put_chunk("dir-def", data, True, "tar")
    assert not (tmp_path / "evil").exists()
    assert not os.path.lexists(cache.path("dir-def"))


def test_cache_tar_round_trip(tmp_path):
    cache = Cache(str(tmp_path / "cache"))
    data = _tar([("a.txt", b"A"), ("sub/b.txt", b"B")])
    assert cache.put_chunk("dir-ok", data[:100], False, "tar") is False
    assert cache.put_chunk("dir-ok", data[100:], True, "tar") is True
    with open(os.path.join(cache.path("dir-ok"), "sub", "b.txt"), "rb") as f:
        assert f.read() == b"B"


def test_cache_file_put_in_chunks(tmp_path):
    cache = Cache(str(tmp_path / "cache"))
    assert cache.put_chunk("file-1", b"hello ", False, "file") is False
    assert cache.put_chunk("file-1", b"world", True, "file") is True
    assert os.path.isfile(cache.path("file-1"))
    with open(cache.path("file-1"), "rb") as f:
        assert f.read() == b"hello world"


@pytest.mark.parametrize("name", ["../x", "/abs", ".hidden", "a/b", "", "UPPER", "x" * 201])
def test_cache_refuses_bad_cachenames(tmp_path, name):
    with pytest.raises(ValueError, match="bad cache name"):
        check_cachename(name)
    cache = Cache(str(tmp_path / "cache"))
    with pytest.raises(ValueError):
        cache.put_chunk(name, b"x", True, "file")
    assert not (tmp_path / "x").exists()


def test_cache_task_level_entry_removed_after_last_user(tmp_path):
    # who references an entry is the state machine's (state.py); the cache does the unlink it decides
    from vinehpc.worker.events import (FileStored, Input, KillRequested, TaskReceived, TaskSpec, Unlink)
    from vinehpc.worker.state import WorkerState
    cache = Cache(str(tmp_path / "cache"))
    assert cache.put_chunk("file-t", b"x", True, "file") is True
    st = WorkerState({"cores": 1, "memory": 0, "disk": 0, "gpus": 0}, files=cache.entries)
    st.handle(FileStored("file-t", "task"), 0.0)
    inp = (Input("file-t", "x", "file", "task", None),)
    for tid in (1, 2):
        st.handle(TaskReceived(TaskSpec(tid, "true", None, inputs=inp)), 0.0)
    assert not [c for c in st.handle(KillRequested(1), 1.0) if isinstance(c, Unlink)]
    assert "file-t" in cache.entries
    unlinks = [c for c in st.handle(KillRequested(2), 1.0) if isinstance(c, Unlink)]
    assert unlinks == [Unlink("file-t")] and "file-t" not in cache.entries
    cache.remove("file-t")
    assert not os.path.exists(cache.path("file-t"))


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), -1, 0])
def test_a_limit_must_be_a_positive_finite_number(bad):
    """inf or nan as a time or memory limit is refused where it is set (no limit: leave it unset),
    never sent to a worker, whose message check would refuse it there."""
    with pytest.raises(ValueError, match="positive finite number"):
        Task("true").set_time_max(bad)
    with pytest.raises(ValueError, match="positive finite number"):
        Task("true").set_memory(bad)


def test_a_task_without_files_holds_no_lists_for_the_collector_and_one_with_files_its_own():
    """Issue 15: three empty lists a task were half the objects of a queued no-op task that the
    garbage collector walks; they are made at a task's first file, each task its own."""
    import gc
    a, b = Task("true"), Task("true")
    assert (a.inputs, a.outputs, a.watched) == ((), (), ())
    assert not any(gc.is_tracked(x) for x in (a.inputs, a.outputs, a.watched))
    f, g = Buffer(b"x"), File("out.txt")
    a.add_input(f, "in.txt")
    a.add_output(g, "out.txt", watch=True)
    a.add_input(Buffer(b"y"), "in2.txt")
    assert a.inputs == [(f, "in.txt"), (a.inputs[1][0], "in2.txt")] and a.outputs == [(g, "out.txt")]
    assert a.watched == ["out.txt"]
    assert (b.inputs, b.outputs, b.watched) == ((), (), ())        # nothing shared
    b.add_input(f, "in.txt")
    assert len(a.inputs) == 2 and b.inputs == [(f, "in.txt")]
