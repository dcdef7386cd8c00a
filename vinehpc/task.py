"""Tasks: command lines (Task) and Python calls (PythonTask), in TaskVine's nouns and verbs."""
from __future__ import annotations

import hashlib
import math
import os
import pickle
import sys
import weakref

import cloudpickle

from .file import File
from .scheduler import policy_name


class TaskError(Exception):
    """A PythonTask did not produce a value (it raised, or the task failed)."""


class PythonTaskNoResult(TaskError):
    """What `PythonTask.output` is when the task produced no value at all (it never ran to its
    end: lost, cancelled, over its resources...), as in TaskVine; `reason` says why."""


# TaskVine's name for it when the task is a FunctionCall: the same class, so `except` and
# isinstance() written for either catch both
FunctionCallNoResult = PythonTaskNoResult


class Resumable(BaseException):
    """The run stopped early (walltime warning): what did not run will run when it is resumed.

    A BaseException, like KeyboardInterrupt, so that a script's `except Exception` does not
    swallow it and the pilot can exit as "resumable".
    """


class RemoteTraceback(Exception):
    """The traceback of an exception raised on a worker, attached as __cause__."""

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self):
        return self.tb


IMAGE_INPUT = ".vinehpc-environment"


def check_remote_name(name) -> str:
    """A remote name must stay inside the task's sandbox."""
    if not isinstance(name, str) or not name:
        raise ValueError("remote name must be a non-empty string, got %r" % (name,))
    if "\0" in name:
        raise ValueError("remote name %r contains a NUL byte" % name)
    if name.startswith("/"):
        raise ValueError("remote name %r is absolute: use a path relative to the task sandbox" % name)
    if any(p in ("..", "", ".") for p in name.split("/")):
        raise ValueError("remote name %r leaves or names the sandbox itself: use a plain relative path "
                         "without '..' or empty components" % name)
    return name


def _positive(name, v, *, allow_zero=False):
    if (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (v == 0 and not allow_zero)
            or not math.isfinite(v)):       # inf, nan: no limit is not a limit (leave it unset)
        raise ValueError("%s must be a positive finite number, got %r" % (name, v))
    return v


class Task:
    """A command line run by /bin/sh in its own sandbox directory on a worker.

    Inputs are linked into the sandbox under their remote names; outputs are collected from
    it when the command ends.  Results (TaskVine's): result (a word: "success" when the
    command ran to its end -- whatever its exit code --, "failed", "output missing" (the task did
    not make an output), "output transfer error" (the manager could not write one it sent),
    "resource exhaustion", "cancelled", ...), exit_code, completed() (result is "success"),
    successful() (completed with exit code 0), std_output (stdout and stderr merged, last
    MiB), reason (a sentence), hostname, addrport, worker, attempts.

    `Task(command, **task_info)` sets what TaskVine's task_info keys name: cores, memory,
    disk, gpus, tag, category, retries, time_max, scheduler, env {name: value}, inputs and
    outputs {file: remote_name}; see TASK_INFO.
    """

    def __init__(self, command: str | None = None, **task_info):
        if isinstance(command, dict):
            raise TypeError("command must be a string, got a dict: did you mean Task(command, **info)?")
        if command is not None and not isinstance(command, str):
            raise TypeError("command must be a string, got %r" % (command,))
        self.command = command
        self.id = None
        # lists from the first add_*: until then the empty tuple, which the garbage collector does
        # not walk (three empty lists were half the objects of a queued no-op task: issue 15)
        self.inputs = ()        # (File, remote_name)
        self.outputs = ()       # (File, remote_name)
        self.watched = ()       # remote names of outputs streamed back while the task runs
        self.env = {}
        self.environment = None  # an environment image (Manager.declare_image) the task runs in
        self.resources = {"cores": None, "memory": None, "disk": None, "gpus": None}
        self.time_max = None
        self.retries = 0
        self.tag = None
        self.key = None
        self.resumed = False
        self.category = "default"
        # filled when the task comes back
        self.state = "new"
        self.result = None
        self.reason = None
        self.exit_code = None
        self.std_output = None
        self.hostname = None
        self.addrport = None    # the worker's address as the manager saw its connection (host:port)
        self.worker = None
        self.attempts = 0
        self.wall_time = None
        self.resources_measured = None
        self.resources_allocated = None    # what its last attempt was given (memory/disk MB, cores, gpus)
        self._abytes = None     # a PythonTask's pickled arguments (the core's state of a task is its TaskState)
        if task_info:
            _apply_task_info(self, task_info)

    def __repr__(self):
        return "<%s %s %s>" % (type(self).__name__, self.id, self.state)

    # -- building ------------------------------------------------------------------
    def add_input(self, file: File, remote_name: str, strict_input: bool = False,
                  mount_symlink: bool = False) -> "Task":
        """Link `file` into the sandbox as `remote_name` before the task runs.

        strict_input, mount_symlink (TaskVine's): accepted; every input is staged to the worker
        that runs the task (a strict input never makes a task fail for want of a cached copy)."""
        if not isinstance(file, File):
            raise TypeError("add_input needs a file from Manager.declare_*(), got %r" % (file,))
        check_remote_name(remote_name)
        if file.kind in ("file",) and file.producer is None and not file.exists():
            raise FileNotFoundError("input file %r does not exist: create it before submitting, or make it "
                                    "the output of a task added earlier" % file.source)
        self._grow("inputs").append((file, remote_name))
        return self

    def add_output(self, file: File, remote_name: str, watch: bool = False, failure_only=None,
                   success_only=None) -> "Task":
        """Collect `remote_name` from the sandbox into `file` when the task ends.

        watch=True (a declare_file output): what the task writes to it reaches the manager's file
        while the task runs (looked at once a second); the complete file still replaces it when
        the task ends.  failure_only/success_only are not supported."""
        if failure_only or success_only:
            raise NotImplementedError("add_output(failure_only=/success_only=) is not supported: vinehpc collects "
                                      "every output of a task that ran to its end")
        if not isinstance(file, File):
            raise TypeError("add_output needs a file from Manager.declare_file/temp(), got %r" % (file,))
        if file.kind not in ("file", "temp"):
            raise ValueError("outputs must be declare_file() or declare_temp() files, got a %s" % file.kind)
        check_remote_name(remote_name)
        if watch and file.kind != "file":
            raise ValueError("only a declare_file() output can be watched (a temp stays on the worker)")
        self._grow("outputs").append((file, remote_name))
        if watch:
            self._grow("watched").append(remote_name)
        return self

    def _grow(self, name) -> list:
        """The list `name` (inputs, outputs, watched) of this task, made at its first item."""
        v = getattr(self, name)
        if type(v) is not list:
            v = list(v)
            setattr(self, name, v)
        return v

    def add_environment(self, image: File) -> "Task":
        """Run this task inside an environment image (from Manager.declare_image)."""
        if not isinstance(image, File) or not image.image:
            raise TypeError("add_environment needs an image from Manager.declare_image(), got %r" % (image,))
        if self.environment is not None:
            raise ValueError("task already runs in %s: a task has one environment image" % self.environment.source)
        self.environment = image
        self._grow("inputs").append((image, IMAGE_INPUT))   # it travels like any input; never linked into the sandbox
        return self

    def set_env_var(self, name: str, value: str | None = None) -> "Task":
        """Set `name` in the task's environment (value None: drop a value set earlier)."""
        if not isinstance(name, str) or not name or "=" in name or "\0" in name:
            raise ValueError("environment variable name must be a non-empty string without '=', got %r" % (name,))
        if value is None:
            self.env.pop(name, None)
        else:
            self.env[name] = str(value)
        return self

    def set_command(self, command: str) -> "Task":
        if not isinstance(command, str) or not command:
            raise TypeError("command must be a non-empty string, got %r" % (command,))
        self.command = command
        return self

    def set_cores(self, cores: int) -> "Task":
        """Cores the task needs (a positive integer): it runs only on a worker with that many free,
        and they are its until it ends. Unset: 1 core, or a whole worker when its category learns
        its allocation (Manager.set_category_mode)."""
        if isinstance(cores, bool) or not isinstance(cores, int) or cores < 1:
            raise ValueError("cores must be a positive integer, got %r" % (cores,))
        self.resources["cores"] = cores
        return self

    def set_memory(self, mb: int) -> "Task":
        """Memory in MB."""
        self.resources["memory"] = int(_positive("memory (MB)", mb))
        return self

    def set_disk(self, mb: int) -> "Task":
        """Sandbox disk in MB."""
        self.resources["disk"] = int(_positive("disk (MB)", mb))
        return self

    def set_gpus(self, gpus: int) -> "Task":
        """GPUs the task needs (0 or more); the ones it gets are in its CUDA_VISIBLE_DEVICES."""
        if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 0:
            raise ValueError("gpus must be a non-negative integer, got %r" % (gpus,))
        self.resources["gpus"] = gpus
        return self

    def set_time_max(self, seconds: float) -> "Task":
        """Wall-time limit: past it the task is killed and returned as 'resource exhaustion'
        (reason: "time: N s used > M s allocated")."""
        self.time_max = float(_positive("time_max (seconds)", seconds))
        return self

    def set_retries(self, retries: int) -> "Task":
        """How many times a failed task is tried again (a lost worker never counts)."""
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError("retries must be a non-negative integer, got %r" % (retries,))
        self.retries = retries
        return self

    def set_tag(self, tag: str) -> "Task":
        """A label of yours (any string), kept on the task and in the journal; the manager does
        nothing with it (TaskVine's wait_for_tag finds tasks by it)."""
        self.tag = str(tag)
        return self

    def set_scheduler(self, scheduler) -> "Task":
        """Accepted (TaskVine's per-task scheduler, e.g. VINE_SCHEDULE_FILES): the manager's
        scheduler (Manager.set_scheduler) places every task; "files" already prefers the
        worker holding most of a task's inputs."""
        policy_name(scheduler)
        return self

    def set_key(self, key: str) -> "Task":
        """Your identity for this task when a run is resumed (default: derived from its command or
        function, arguments, environment and input contents; see vinehpc/resume.py)."""
        if not isinstance(key, str) or not key:
            raise ValueError("key must be a non-empty string, got %r" % (key,))
        self.key = key
        return self

    def set_category(self, category: str) -> "Task":
        """The task's category (default "default"): tasks of one category share the resource
        policy set with Manager.set_category_mode and friends, and its statistics
        (Manager.stats_category)."""
        if not isinstance(category, str) or not category:
            raise ValueError("category must be a non-empty string, got %r" % (category,))
        self.category = category
        return self

    # -- results --------------------------------------------------------------------
    def completed(self) -> bool:
        """The task ran to its end (result "success"), whatever its exit code (TaskVine's meaning)."""
        return self.result == "success"

    def successful(self) -> bool:
        """Completed with exit code 0 (or the function returned) and outputs collected."""
        return self.result == "success" and not self.exit_code

    @property
    def output(self):
        """A command's std_output (TaskVine's name; a PythonTask's is the function's value)."""
        return self.std_output

    @property
    def result_string(self) -> str | None:
        """The result word (older TaskVine scripts read it under this name)."""
        return self.result

    # -- wire -----------------------------------------------------------------------
    def _check(self):
        if not self.command:
            raise ValueError("task has no command: Task('your command line')")

    def _spec(self) -> dict:
        return {"cmd": self.command}


# TaskVine's task_info keys -> the setter each calls; keys TaskVine knows and vinehpc does not do
# (yet) are refused by name rather than silently dropped
TASK_INFO = {"cores": "set_cores", "memory": "set_memory", "disk": "set_disk", "gpus": "set_gpus",
             "tag": "set_tag", "category": "set_category", "retries": "set_retries", "time_max": "set_time_max",
             "scheduler": "set_scheduler"}
TASK_INFO_UNSUPPORTED = ("library_required", "library_provided", "snapshot_file", "priority",
                         "time_end", "time_start", "time_min", "monitor_output", "features")


def _apply_task_info(task, info: dict) -> None:
    for key, value in info.items():
        if key in TASK_INFO:
            getattr(task, TASK_INFO[key])(value)
        elif key == "env":
            for name, v in dict(value).items():
                task.set_env_var(name, v)
        elif key in ("inputs", "outputs"):
            add = task.add_input if key == "inputs" else task.add_output
            for f, where in dict(value).items():
                if isinstance(where, dict):
                    add(f, **where)
                else:
                    add(f, where)
        elif key in TASK_INFO_UNSUPPORTED:
            raise NotImplementedError("Task(..., %s=) is not supported by vinehpc yet (supported: %s)"
                                      % (key, ", ".join(sorted(TASK_INFO) + ["env", "inputs", "outputs"])))
        else:
            raise TypeError("Task() got an unknown task_info key %r" % (key,))


_fn_cache = weakref.WeakKeyDictionary()
_by_value_roots = []
_by_value_names = []    # encoded names of the script's modules registered to pickle by value


def pickle_by_value_under(directory: str) -> None:
    """Pickle functions and classes of modules under `directory` (the user's script dir) by value:
    workers need not have the user's helper modules on their path."""
    d = os.path.abspath(directory)
    if d not in _by_value_roots:
        _by_value_roots.append(d)


def _register_by_value(fn) -> None:
    """The module of `fn`, if it is the user's (see pickle_by_value_under), travels by value."""
    if _by_value_roots:
        _register_module(sys.modules.get(getattr(fn, "__module__", None) or ""))


def _register_script_modules() -> None:
    """Every module of the user's imported so far travels by value: a class of a helper module
    next to the script, passed as an argument, reaches workers that cannot import it.  Scans
    sys.modules only when it grew."""
    global _modules_seen
    if not _by_value_roots or len(sys.modules) == _modules_seen:
        return
    _modules_seen = len(sys.modules)
    for mod in list(sys.modules.values()):
        _register_module(mod)


_modules_seen = 0


def _register_module(mod) -> None:
    f = getattr(mod, "__file__", None)
    if mod is None or not f or mod.__name__ == "__main__" or mod.__name__.encode() in _by_value_names:
        return
    f = os.path.abspath(f)
    if any(f.startswith(r + os.sep) for r in _by_value_roots) and not _installed(mod.__name__, f):
        try:
            cloudpickle.register_pickle_by_value(mod)
        except (ValueError, AttributeError):
            return
        _by_value_names.append(mod.__name__.encode())


_install_dir = {}      # directory -> it holds pip-installed packages (*.dist-info)


def _installed(name: str, path: str) -> bool:
    """Whether module `name` (file `path`) was installed by pip -- into site-packages, or into a
    directory of its own that may lie next to the script (`pip install --target ./lib`, which
    holds the packages' *.dist-info): such a library is imported on workers like any installed
    one; pickled by value it is slow at best (awkward's classes recurse without end)."""
    if "site-packages" in path or "dist-packages" in path:
        return True
    root = path
    for _ in range(name.count(".") + (2 if os.path.basename(path).startswith("__init__.") else 1)):
        root = os.path.dirname(root)     # the directory the top-level package was found in
    if root not in _install_dir:
        try:
            _install_dir[root] = any(e.endswith(".dist-info") for e in os.listdir(root))
        except OSError:
            _install_dir[root] = False
    return _install_dir[root]


def _dumps(args: tuple, kwargs: dict, what: str) -> bytes:
    """Arguments travel by value like the function (cloudpickle): a function, class or instance
    defined in the user's script must not be pickled as a reference to a `__main__` (or a helper
    module of the script) that the worker lacks.  Plain pickle first -- the common case, several
    times faster -- and cloudpickle when its bytes name such a module (a false hit on a string
    that merely contains the name only costs the slower path)."""
    obj = (args, kwargs)
    _register_script_modules()
    try:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        if b"__main__" not in data and not any(n in data for n in _by_value_names):
            return data
    except Exception:
        pass
    try:
        return cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as e:
        raise TypeError("cannot send %s to a worker: it cannot be pickled (%s: %s). Pass plain data, "
                        "or create the object inside the function" % (what, type(e).__name__, e)) from e


def function_bytes(fn) -> tuple:
    """(fid, bytes) for a function, pickled by value once per function object."""
    try:
        hit = _fn_cache.get(fn)
    except TypeError:
        hit = None
    if hit is not None:
        return hit
    _register_by_value(fn)
    try:
        data = cloudpickle.dumps(fn, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as e:
        raise TypeError("cannot send function %r to a worker: it cannot be pickled (%s: %s)"
                        % (getattr(fn, "__qualname__", fn), type(e).__name__, e)) from e
    hit = ("fn-" + hashlib.blake2b(data, digest_size=16).hexdigest(), data)
    try:
        _fn_cache[fn] = hit
    except TypeError:
        pass
    return hit


class PythonTask(Task):
    """fn(*args, **kwargs) run in a long-lived Python interpreter on a worker.

    The function is pickled by value (cloudpickle) once and sent once per worker; the
    arguments are pickled by value too, at submit, so an unpicklable one is an error there.
    After the task returns, `output` is (as in TaskVine) the value, or the exception the
    function raised (its __cause__ is the remote traceback), or a PythonTaskNoResult when the
    task produced nothing; `exception` is that exception or None; `output_or_raise()` returns
    the value or raises TaskError with the exception as __cause__.
    """

    def __init__(self, fn, *args, **kwargs):
        if not callable(fn):
            raise TypeError("PythonTask needs a callable, got %r" % (fn,))
        super().__init__(None)
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self._fid = self._fbytes = self._abytes = None
        self._result = None      # pickled (ok, value) from the worker
        self._loaded = None

    def _check(self):
        self._fid, self._fbytes = function_bytes(self.fn)
        self._abytes = _dumps(self.args, self.kwargs,
                              "an argument of %s" % getattr(self.fn, "__qualname__", self.fn))

    def _spec(self) -> dict:
        return {"fid": self._fid}

    def _load(self):
        if self._loaded is None:
            name = getattr(self.fn, "__qualname__", repr(self.fn))
            if self._result is None:
                err = PythonTaskNoResult("task %s (%s) produced no result: %s" % (self.id, name,
                                                                               self.reason or self.result))
                self._loaded = (False, err)
            else:
                try:
                    ok, value, tb = pickle.loads(self._result)
                except Exception as e:
                    ok, value, tb = False, TaskError("cannot unpickle the result of task %s: %s" % (self.id, e)), None
                if not ok and tb:
                    value.__cause__ = RemoteTraceback("\n[task %s on worker %s, host %s]\n%s"
                                                      % (self.id, self.worker, self.hostname, tb))
                self._loaded = (ok, value)
        return self._loaded

    @property
    def output(self):
        """The function's value; or the exception it raised (as a value, not raised: see
        output_or_raise and exception); PythonTaskNoResult if no result came back."""
        return self._load()[1]

    def output_or_raise(self):
        """The function's value, or raise TaskError (the remote exception as its __cause__)."""
        ok, value = self._load()
        if ok:
            return value
        if isinstance(value, TaskError):
            raise value
        raise TaskError("task %s raised %s: %s" % (self.id, type(value).__name__, value)) from value

    @property
    def exception(self):
        """The exception the function raised (its remote traceback as __cause__), None if it
        returned a value; PythonTaskNoResult when no result came back (the task could not run),
        TaskError when the result could not be unpickled."""
        ok, value = self._load()
        return None if ok else value
