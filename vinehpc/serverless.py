"""Serverless libraries (TaskVine's LibraryTask and FunctionCall) on the workers' warm interpreters.

A library is a named set of functions, pickled by value (cloudpickle) once into one blob,
with optional hoisted imports and a context function whose result the functions read with
load_variable_from_library().  It travels like a PythonTask's function: the blob is sent
once per worker (the core's SendFunction, keyed by its content id) and each interpreter
unpickles it, imports the hoisted modules and runs the context once, at its first call.  A
FunctionCall names the library and the function and carries only its arguments, so a call
costs what a PythonTask costs once its function is warm: no new path through the core, the
server or the worker loop.

exec_mode "direct" runs a call in the interpreter itself (cheapest: state the call leaves
behind is seen by the next one); "fork" runs it in a fork of the warm interpreter (each call
starts from the library's state as loaded and cannot damage it).  function slots: at most
that many calls of one library run at once on one worker (the task message's `slots`,
enforced by the worker's state machine).
"""
from __future__ import annotations

import hashlib
import pickle
import sys
import threading
import types
import weakref

import cloudpickle

from .core.events import ForgetFunction
from .task import PythonTask, Task, _dumps, _register_by_value

MODES = ("fork", "direct")
LIBRARY_ID = "lib-"          # a library's content id starts so (worker/pyrunner.py: its calls are not measured)
VARS_MODULE = "_vinehpc_library_vars"   # where an interpreter puts the running library's context values

# Libraries installed by live managers, by name.  A FunctionCall is checked against this at
# submit (Task._check has no manager to ask), so library names are per process: installing a
# name again replaces it, for every manager of this process.
_installed = {}
_lock = threading.Lock()


def load_variable_from_library(name):
    """Inside a function of a library: the value `name` of the dict its context function returned."""
    mod = sys.modules.get(VARS_MODULE)
    if mod is None or mod.vars is None:
        raise RuntimeError("load_variable_from_library(%r) works only inside a FunctionCall of a library that "
                           "has a context (create_library_from_functions(..., library_context_info=[fn, args, "
                           "kwargs]))" % (name,))
    try:
        return mod.vars[name]
    except KeyError:
        raise KeyError("the library's context function returned no %r (it returned: %s)"
                       % (name, ", ".join(map(repr, mod.vars)) or "nothing")) from None


class LibraryTask(Task):
    """A library of Python functions to install on workers (Manager.create_library_from_functions).

    Its resources (set_cores, set_memory, ...) are those of one library instance and are shared
    by its function slots: a FunctionCall that sets none of its own gets the library's divided by
    set_function_slots (else a PythonTask's default, one core).  Its inputs and environment image
    go with every call, so the context function can read them from its working directory."""

    def __init__(self, fn=None, library_name=None):
        super().__init__(None)
        if library_name is None:        # LibraryTask(name): the short form
            fn, library_name = None, fn
        if not isinstance(library_name, str) or not library_name:
            raise ValueError("a library needs a non-empty name, got %r" % (library_name,))
        if fn is not None:
            raise ValueError("vinehpc libraries are made from Python functions: use "
                             "Manager.create_library_from_functions(%r, fn, ...)" % library_name)
        self.library_name = library_name
        self.functions = {}
        self.hoisting_modules = []
        self.context = None
        self.exec_mode = "fork"
        self.function_slots = None
        self._blob = None
        self._per_call = {}

    # -- TaskVine's setters ---------------------------------------------------------
    def set_function_slots(self, nslots: int) -> "LibraryTask":
        """At most `nslots` calls of this library run at once on one worker."""
        if isinstance(nslots, bool) or not isinstance(nslots, int) or nslots < 1:
            raise ValueError("function slots must be a positive integer, got %r" % (nslots,))
        self.function_slots = nslots
        return self

    def set_exec_mode(self, mode: str) -> "LibraryTask":
        if mode not in MODES:
            raise ValueError("exec_mode must be 'fork' or 'direct', got %r" % (mode,))
        self.exec_mode = mode
        self._blob = None
        return self

    set_function_exec_mode_from_string = set_exec_mode

    def set_library_provided(self, name: str) -> "LibraryTask":
        self.library_name = name
        return self

    provides_library = set_library_provided

    def get_library_provided(self) -> str:
        return self.library_name

    get_libray_provided = get_library_provided     # (TaskVine's spelling, kept for ported code)

    def _check(self):
        raise TypeError("a LibraryTask is not submitted: install it with Manager.install_library(lib), then "
                        "submit FunctionCall(%r, 'function', ...) tasks" % self.library_name)

    # -- what travels ----------------------------------------------------------------
    def _bytes(self):
        """(fid, blob): the library pickled by value once; the id names its content."""
        if self._blob is None:
            for f in self.functions.values():
                _register_by_value(f)
            # a dict, where a PythonTask's blob is a function: how its interpreter tells them apart
            lib = {"name": self.library_name, "functions": self.functions, "hoist": list(self.hoisting_modules),
                   "context": self.context, "mode": self.exec_mode}
            try:
                data = cloudpickle.dumps(lib, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as e:
                raise TypeError("cannot send library %r to workers: it cannot be pickled (%s: %s)"
                                % (self.library_name, type(e).__name__, e)) from e
            self._blob = (LIBRARY_ID + hashlib.blake2b(data, digest_size=16).hexdigest(), data)
        return self._blob


class FunctionCall(PythonTask):
    """library.fn(*args, **kwargs), run by an installed library (TaskVine's FunctionCall).

    `library`: its name (or the LibraryTask); `fn`: the function's name (or the function).
    Results as a PythonTask's: `output`, `exception`, `successful()`."""

    def __init__(self, library, fn, *args, **kwargs):
        Task.__init__(self, None)
        name = library.library_name if isinstance(library, LibraryTask) else library
        if not isinstance(name, str) or not name:
            raise TypeError("FunctionCall needs a library name, got %r" % (library,))
        fname = fn if isinstance(fn, str) else getattr(fn, "__name__", None)
        if not fname:
            raise TypeError("FunctionCall needs the name of a function of library %r, got %r" % (name, fn))
        self.library_name, self.function_name = name, fname
        self.fn = "%s.%s" % (name, fname)    # what PythonTask's messages name
        self.args, self.kwargs = args, kwargs
        self._fid = self._fbytes = self._abytes = None
        self._result = self._loaded = None
        self._slots = None

    def set_fn_args(self, args=(), kwargs=None) -> "FunctionCall":
        """Replace the call's arguments (before it is submitted)."""
        self.args, self.kwargs = tuple(args), dict(kwargs or {})
        return self

    def _check(self):
        lib = installed(self.library_name)
        if lib is None:
            raise ValueError("library %r is not installed: create it with lib = m.create_library_from_functions("
                             "%r, %s, ...) and call m.install_library(lib) before submitting FunctionCalls"
                             % (self.library_name, self.library_name, self.function_name))
        if self.function_name not in lib.functions:
            raise ValueError("library %r has no function %r (it has: %s)"
                             % (self.library_name, self.function_name, ", ".join(sorted(lib.functions))))
        self._fid, self._fbytes = lib._bytes()
        # the function's name travels first among the arguments: the interpreter takes it off
        self._abytes = _dumps((self.function_name,) + tuple(self.args), self.kwargs,
                              "an argument of %s" % self.fn)
        self._slots = lib.function_slots
        for k, v in lib._per_call.items():
            if self.resources[k] is None:
                self.resources[k] = v
        if lib.inputs:             # (the common library has none: a call stays as cheap as it can be)
            have = {id(f) for f, _ in self.inputs}
            self._grow("inputs").extend((f, r) for f, r in lib.inputs if id(f) not in have)
            if lib.environment is not None and self.environment is None:
                self.environment = lib.environment
        if lib.env:
            self.env = dict(lib.env, **self.env)

    def _spec(self) -> dict:
        spec = {"fid": self._fid}
        if self._slots:
            spec["slots"] = self._slots
        return spec


def per_call(lib) -> dict:
    """A library instance's resources shared by its slots: what one call gets by default."""
    n = lib.function_slots or 1
    out = {}
    for k, v in lib.resources.items():
        if v:
            out[k] = max(1, v // n) if k != "gpus" else v // n
    return out


def _imports(spec) -> list:
    """TaskVine's `imports` dict as [(module, [(global name, attribute of the module or None)])]."""
    out = []
    for mod, what in dict(spec).items():
        if not isinstance(mod, str) or not mod:
            raise TypeError("imports maps module names to aliases or names, got key %r" % (mod,))
        if not what:                                   # import math
            out.append((mod, [(mod.split(".")[0], None)]))
        elif isinstance(what, str):                    # import numpy as np
            out.append((mod, [(what, None)]))
        elif isinstance(what, dict):                   # from time import sleep as time_sleep
            out.append((mod, [(alias or attr, attr) for attr, alias in what.items()]))
        else:                                          # from random import uniform
            out.append((mod, [(attr, attr) for attr in what]))
    return out


def installed(name):
    """The LibraryTask installed under `name` by a manager still open, or None."""
    with _lock:
        hit = _installed.get(name)
    if hit is None:
        return None
    m = hit[0]()
    return hit[1] if m is not None and not m.closed else None


class LibraryMixin:
    """Manager methods for libraries (mixed into vinehpc.Manager)."""

    def create_library_from_functions(self, library_name, *function_list, poncho_env=None, init_command=None,
                                      add_env=True, hoisting_modules=None, import_modules=None, imports=None,
                                      exec_mode="fork", library_context_info=None, function_infile_load_mode=None,
                                      infile_load_mode=None) -> LibraryTask:
        """A LibraryTask holding `function_list` (called by their __name__), to install_library().

        hoisting_modules (or import_modules): modules imported once per interpreter before the
        first call; imports (TaskVine's older form): {"numpy": "np", "math": "", "random":
        ["uniform"], "time": {"sleep": "time_sleep"}} -- each name bound in the functions' globals.
        exec_mode: "fork" (default, each call in a fork of the warm library) or "direct" (in the
        library's interpreter itself).  library_context_info=[fn, args, kwargs]:
        fn(*args, **kwargs) runs once per interpreter and returns a dict whose values the
        functions read with load_variable_from_library(name).  add_env is accepted and has no
        effect: calls run in the worker's Python (or the library's add_environment image).
        poncho_env and init_command are not supported (build an image with `vinehpc sysimage`
        and give it with lib.add_environment(m.declare_image(...))).  function_infile_load_mode
        (older name infile_load_mode): how TaskVine's library reads a call's arguments; here they
        always travel pickled, so only "cloudpickle" (TaskVine's default) is accepted."""
        for key, mode in (("function_infile_load_mode", function_infile_load_mode),
                          ("infile_load_mode", infile_load_mode)):
            if mode not in (None, "cloudpickle"):
                raise NotImplementedError(
                    "%s=%r is not supported: a call's arguments always travel pickled (cloudpickle) with the "
                    "call; pass Python values as arguments (FunctionCall(lib, fn, *args)), not a JSON or text "
                    "event" % (key, mode))
        if poncho_env is not None or init_command is not None:
            raise NotImplementedError("poncho_env and init_command are not supported: build an environment image "
                                      "with `vinehpc sysimage python ...` and give it to the library with "
                                      "lib.add_environment(m.declare_image(path))")
        lib = LibraryTask(library_name)
        lib.set_exec_mode(exec_mode)
        if not function_list:
            raise ValueError("library %r needs at least one function" % library_name)
        for f in function_list:
            name = getattr(f, "__name__", None)
            if not callable(f) or not name or name == "<lambda>":
                raise TypeError("library functions are called by name: give named functions, got %r" % (f,))
            if name in lib.functions and lib.functions[name] is not f:
                raise ValueError("library %r has two functions named %r" % (library_name, name))
            lib.functions[name] = f
        for mod in list(hoisting_modules or ()) + list(import_modules or ()):
            mname = mod.__name__ if isinstance(mod, types.ModuleType) else mod
            if not isinstance(mname, str) or not mname:
                raise TypeError("hoisting_modules takes modules (or their names), got %r" % (mod,))
            lib.hoisting_modules.append((mname, [(mname.split(".")[0], None)]))
        lib.hoisting_modules.extend(_imports(imports or {}))
        if library_context_info is not None:
            try:
                fn, args, kwargs = library_context_info
            except (TypeError, ValueError):
                raise TypeError("library_context_info is [function, args, kwargs], got %r"
                                % (library_context_info,)) from None
            if not callable(fn):
                raise TypeError("library_context_info[0] must be a function, got %r" % (fn,))
            lib.context = (fn, tuple(args or ()), dict(kwargs or {}))
        return lib

    def install_library(self, task: LibraryTask) -> None:
        """Make `task`'s library available to FunctionCalls.  Workers get it with the first call
        sent to them (once per worker; kept warm in each interpreter that runs its calls)."""
        if not isinstance(task, LibraryTask):
            raise TypeError("install_library needs a LibraryTask (from create_library_from_functions), got %r"
                            % (task,))
        self._check_open()
        task._bytes()          # a library that cannot be pickled fails here, not at its first call
        task._per_call = per_call(task)     # as installed (TaskVine, too, takes the library as it is then)
        with _lock:
            _installed[task.library_name] = (weakref.ref(self), task)

    def remove_library(self, name: str) -> None:
        """FunctionCalls to `name` submitted from now on fail; those already submitted still run.
        Workers' interpreters drop what they loaded of it (functions, context state)."""
        with _lock:
            hit = _installed.get(name)
            if hit is None or hit[0]() is not self:
                raise KeyError("library %r is not installed on this manager" % (name,))
            del _installed[name]
        self._server.post(ForgetFunction(hit[1]._bytes()[0]))

    def check_library_exists(self, name: str) -> bool:
        with _lock:
            hit = _installed.get(name)
        return hit is not None and hit[0]() is self
