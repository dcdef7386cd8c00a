"""Resume after a walltime kill: tasks that completed in an earlier run are not run again.

A task's identity (its *key*) is a hash of what determines its result:
  - a command task: the command line; a PythonTask: the function's pickled bytes and the
    pickled arguments;
  - its environment variables;
  - each input's remote name and content: a file's content hash, a buffer's bytes, a URL and
    its validators (ETag/Last-Modified/size), or, for a temp or a file that an earlier task
    produces, that producer's key and the output's remote name;
  - its outputs' remote names and destinations.
Or, with `task.set_key("...")`, the user's key alone (for tasks whose bytes change between
runs, e.g. functions that close over a timestamp).

Completed tasks are recorded in the run directory's transactions.jsonl ("completed" records)
with their results in results.bin.  A later Manager with the same run_dir (a resubmitted
pilot job) returns a task whose key was completed as recorded (task.resumed is True), but
only if each of its output files is still there with the recorded size and mtime; a changed
input changes the key, so a stale result is never returned.
"""
from __future__ import annotations

import hashlib
import os
import pickle

from . import journal as _journal
from .private import check_store, open_private


def task_key(task) -> str:
    if getattr(task, "key", None):
        return "user-" + hashlib.blake2b(task.key.encode(), digest_size=20).hexdigest()
    h = hashlib.blake2b(digest_size=20)

    def put(*parts):
        for p in parts:
            b = p if isinstance(p, bytes) else str(p).encode()
            h.update(b"%d:" % len(b))
            h.update(b)

    if getattr(task, "_fid", None) is not None:
        put("py", task._fid, task._abytes)
    else:
        put("cmd", task.command)
    for k in sorted(task.env):
        put("env", k, task.env[k])
    for f, remote in task.inputs:
        put("in", remote, file_identity(f))
    for f, remote in task.outputs:
        put("out", remote, f.kind, f.source if f.kind == "file" else "")
    return h.hexdigest()


def file_identity(f) -> str:
    made_by = getattr(f, "_made_by", None)
    if made_by is not None:
        return "made:%s:%s" % made_by
    if f.kind == "file":
        return f.cachename()
    return f.cachename()


class RunDirInUse(RuntimeError):
    pass


def lock_run_dir(run_dir: str):
    """Hold `run_dir` for this process (released when it exits). Two runs appending to one
    run directory would interleave their results: the second is refused, saying why."""
    import fcntl
    import socket
    path = os.path.join(run_dir, "lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RunDirInUse("run directory %s is in use by %s: wait for that run to end, or give this one its own "
                          "run directory (--run-dir, VINEHPC_RUN_DIR or Manager(run_dir=...))" % (run_dir, holder)) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, ("pid %d on %s" % (os.getpid(), socket.gethostname())).encode(), 0)
    return fd


class Resume:
    """What earlier runs in this run directory completed, and the recorder for this one."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        check_store(run_dir, ("transactions.jsonl", "results.bin"))     # before anything is read from it
        self._lock = lock_run_dir(run_dir)
        self.results_path = os.path.join(run_dir, "results.bin")
        self.completed = {}
        self.resumed = 0          # tasks of this run returned as completed (restore)
        jpath = os.path.join(run_dir, "transactions.jsonl")
        if os.path.exists(jpath):
            size = os.path.getsize(self.results_path) if os.path.exists(self.results_path) else 0
            for rec in _journal.read(jpath):
                if rec.get("event") == "completed" and rec.get("key"):
                    off, n = rec.get("at", (0, 0))
                    if off + n <= size:       # a torn results file drops only what it lost
                        self.completed[rec["key"]] = rec
        self._out = open_private(self.results_path, "ab")

    def lookup(self, task):
        """The completed record for this task, or None if it must run."""
        rec = self.completed.get(task._key)
        if rec is None:
            return None
        for path, (size, mtime) in (rec.get("outputs") or {}).items():
            try:
                st = os.stat(path)
            except OSError:
                return None
            if os.path.isfile(path) and (st.st_size != size or st.st_mtime_ns != mtime):
                return None
        return rec

    def restore(self, task, rec) -> None:
        off, n = rec["at"]
        with open(self.results_path, "rb") as f:
            f.seek(off)
            data = pickle.loads(f.read(n))
        task._result = data.get("result")
        task.std_output = data.get("stdout")
        task.exit_code = data.get("exit_code")
        task.hostname = data.get("hostname")
        task.wall_time = data.get("wall")
        task.result = "success"
        task.resumed = True
        self.resumed += 1

    def record(self, task) -> dict:
        """Append a completed task's result; returns its journal record."""
        data = pickle.dumps({"result": getattr(task, "_result", None), "stdout": task.std_output,
                             "exit_code": task.exit_code, "hostname": task.hostname, "wall": task.wall_time},
                            protocol=pickle.HIGHEST_PROTOCOL)
        off = self._out.seek(0, os.SEEK_END)     # the lock makes us the only writer
        self._out.write(data)
        outputs = {}
        for f, _ in task.outputs:
            if f.kind == "file":
                try:
                    st = os.stat(f.source)
                    outputs[f.source] = (st.st_size, st.st_mtime_ns)
                except OSError:
                    pass
        return {"event": "completed", "task": task.id, "key": task._key, "at": (off, len(data)), "outputs": outputs}

    def flush(self) -> None:
        self._out.flush()

    def close(self) -> None:
        self._out.close()
        os.close(self._lock)      # releases the run directory
