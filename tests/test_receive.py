"""Receiving a file in chunks (vinehpc/comm/receive.py): the worker's cache and the manager's outputs."""
from __future__ import annotations

import io
import os
import tarfile

import pytest

from vinehpc.comm.receive import Incoming


def _tar(files: dict) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_file_appears_only_when_complete(tmp_path):
    dest, part = tmp_path / "out.txt", tmp_path / "out.txt.part"
    inc = Incoming(str(dest), str(part), mode=0o555)
    inc.write(b"hello ")
    assert not dest.exists() and part.exists()
    inc.write(b"world")
    inc.finish()
    assert dest.read_bytes() == b"hello world" and not part.exists()
    assert dest.stat().st_mode & 0o777 == 0o555


def test_directory_replaces_the_old_one_at_once(tmp_path):
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    inc = Incoming(str(dest), str(tmp_path / "d.part"), tar=True)
    inc.write(_tar({"a.txt": b"A", "sub/b.txt": b"B"}))
    inc.finish()
    assert sorted(os.listdir(dest)) == ["a.txt", "sub"] and (dest / "sub" / "b.txt").read_bytes() == b"B"
    assert sorted(os.listdir(tmp_path)) == ["d"]


def test_parents_created_on_request(tmp_path):
    dest = tmp_path / "x" / "y" / "f"
    inc = Incoming(str(dest), str(dest) + ".part", parents=True)
    inc.write(b"1")
    inc.finish()
    assert dest.read_bytes() == b"1"


def test_an_error_is_raised_once_at_the_end_and_leaves_nothing(tmp_path):
    dest = tmp_path / "missing-dir" / "f"
    inc = Incoming(str(dest), str(dest) + ".part")     # cannot open: kept, not raised
    inc.write(b"ignored")
    with pytest.raises(OSError):
        inc.finish()
    assert os.listdir(tmp_path) == []


def test_a_bad_tar_leaves_nothing(tmp_path):
    inc = Incoming(str(tmp_path / "d"), str(tmp_path / "d.part"), tar=True)
    inc.write(_tar({"../evil": b"x"}))
    with pytest.raises((tarfile.TarError, OSError)):
        inc.finish()
    assert os.listdir(tmp_path) == []


def test_abort_removes_the_part(tmp_path):
    inc = Incoming(str(tmp_path / "f"), str(tmp_path / "f.part"))
    inc.write(b"half")
    inc.abort()
    assert os.listdir(tmp_path) == []
