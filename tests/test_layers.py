"""The import graph follows the layers (see ARCHITECTURE.md), checked on the source with `ast`.

Every module of the four packages is parsed; every import counts, at module level or inside a
function (a lazy import is still a dependency), relative imports resolved, and so do
importlib.import_module / __import__ calls with a literal name.  The tree is walked, so new
modules are checked without being listed here.

    vinehpc.protocol                      standard library only (a leaf); orjson, optional, in wire.py
    userlevel_net, sysimage_tools         of the project, at most vinehpc.protocol (leaves)
    vinehpc (the engine)                  may import the leaves, never launcher
    launcher                              imports the engine
    vinehpc.cli                           on top: imported by vinehpc/__main__.py only
    vinehpc.core, vinehpc.scheduler       no I/O: no sockets, threads, processes, server, comm
    vinehpc.worker                        never the manager side
    mpi4py                                inside launcher/ only
    VINEHPC_* / SLURM* variables          read in the config modules only (Settings.from_env)
    launcher, vinehpc.cli                 the engine's public interface only: no obj._private
"""
from __future__ import annotations

import ast
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("vinehpc", "launcher", "userlevel_net", "sysimage_tools")
LEAVES = ("userlevel_net", "sysimage_tools")
TOP = ("vinehpc.cli", "vinehpc.__main__")          # above launcher
NO_IO = ("socket", "selectors", "select", "asyncio", "threading", "subprocess", "multiprocessing",
         "vinehpc.server", "vinehpc.comm", "vinehpc.manager", "vinehpc.futures")
MANAGER_SIDE = ("vinehpc.manager", "vinehpc.server", "vinehpc.core", "vinehpc.scheduler", "vinehpc.futures",
                "vinehpc.netprobe", "vinehpc.local")
# where the environment is read: the engine's Settings, and the leaves' own (they run without the engine)
CONFIG_MODULES = ("vinehpc.config", "sysimage_tools.config", "userlevel_net.config")
ENV_PREFIXES = ("VINEHPC_", "SLURM")
# `from vinehpc import Manager` loads vinehpc.manager (vinehpc/__init__.py imports on first use)
REEXPORTS = {"vinehpc": {"Manager": "manager", "Executor": "futures", "File": "file", "Task": "task",
                         "PythonTask": "task", "PythonTaskNoResult": "task", "TaskError": "task", "RemoteTraceback": "task",
                         "Resumable": "task"}}


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _modules(root: str):
    """(module name, path, is_package) of every .py file of the packages under root."""
    for pkg in PACKAGES:
        top = os.path.join(root, pkg)
        for d, dirs, files in os.walk(top):
            dirs[:] = sorted(x for x in dirs if not x.startswith((".", "__pycache__")))
            for f in sorted(files):
                if f.endswith(".py"):
                    path = os.path.join(d, f)
                    parts = os.path.relpath(path, root)[:-3].split(os.sep)
                    is_pkg = parts[-1] == "__init__"
                    yield ".".join(parts[:-1] if is_pkg else parts), path, is_pkg


def _is_package(root: str, name: str) -> bool:
    return os.path.isfile(os.path.join(root, *name.split("."), "__init__.py"))


def imports(root: str, module: str, path: str, is_pkg: bool):
    """(line, imported module) for every import in the file, relative ones resolved."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    package = module if is_pkg else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            if mod == "__future__":
                continue
            for a in node.names:
                sub = REEXPORTS.get(mod, {}).get(a.name, a.name)
                # `from pkg import name`: the submodule when pkg is one of ours, else pkg itself
                yield node.lineno, (mod + "." + sub if a.name != "*" and _is_package(root, mod) else mod)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str) and not node.args[0].value.startswith(".")
              and (getattr(node.func, "id", None) == "__import__"
                   or getattr(node.func, "attr", None) == "import_module")):
            yield node.lineno, node.args[0].value


# an accelerator the leaf runs without (an ImportError falls back to the standard library: an image
# or a foreign interpreter without it speaks the same messages)
OPTIONAL = {("vinehpc.protocol.wire", "orjson")}


def _rules(module: str, target: str):
    """The rules `module` importing `target` breaks (texts)."""
    top = target.split(".")[0]
    ours = top in PACKAGES
    broken = []
    if _under(module, ("vinehpc.protocol",)):
        if (top not in sys.stdlib_module_names and not _under(target, ("vinehpc.protocol",))
                and (module, target) not in OPTIONAL):
            broken.append("vinehpc.protocol is a leaf: standard library only")
    for leaf in LEAVES:
        if _under(module, (leaf,)) and ours and not _under(target, (leaf, "vinehpc.protocol")):
            broken.append("%s is a leaf: of the project it imports at most vinehpc.protocol" % leaf)
    if _under(module, ("vinehpc",)) and module not in TOP and top == "launcher":
        broken.append("the engine (vinehpc) never imports launcher: launcher imports the engine")
    if _under(target, ("vinehpc.cli",)) and module not in TOP:
        broken.append("vinehpc.cli is on top: only vinehpc/__main__.py imports it")
    if _under(module, ("vinehpc.core", "vinehpc.scheduler")) and _under(target, NO_IO):
        broken.append("vinehpc.core and vinehpc.scheduler do no I/O (no %s)" % target)
    if _under(module, ("vinehpc.worker",)) and _under(target, MANAGER_SIDE):
        broken.append("the worker never imports the manager side (%s)" % target)
    if top == "mpi4py" and not _under(module, ("launcher",)):
        broken.append("mpi4py is imported inside launcher/ only")
    return broken


def env_reads(path: str):
    """(line, name) for every read of a VINEHPC_*/SLURM* variable: NAME as the argument of
    .get/.pop/getenv/setdefault, as a subscript that is read, or tested with `in`.  Setting
    one for a child process (env["X"] = ..., dict(os.environ, X=...)) or removing it from a
    child's environment (a statement env.pop("X", None)) is not a read."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    discarded = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Call)}

    def named(n):
        return isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.startswith(ENV_PREFIXES)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args and named(node.args[0]) and (
                getattr(node.func, "attr", None) in ("get", "getenv", "setdefault")
                or getattr(node.func, "id", None) == "getenv"
                or (getattr(node.func, "attr", None) == "pop" and id(node) not in discarded)):
            yield node.lineno, node.args[0].value
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and named(node.slice):
            yield node.lineno, node.slice.value
        elif (isinstance(node, ast.Compare) and named(node.left)
              and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops)):
            yield node.lineno, node.left.value


def private_uses(path: str):
    """(line, attribute) for every `obj._name` where obj is not self or cls (dunders aside)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.endswith("__")
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
            yield node.lineno, node.attr


def check(root: str = ROOT) -> list:
    """Every broken rule under root, as "path:line: module imports target: rule"."""
    out = []
    for module, path, is_pkg in _modules(root):
        rel = os.path.relpath(path, root)
        for line, target in imports(root, module, path, is_pkg):
            for rule in _rules(module, target):
                out.append("%s:%d: %s imports %s: %s" % (rel, line, module, target, rule))
        if _under(module, ("launcher",) + TOP):
            for line, attr in private_uses(path):
                out.append("%s:%d: %s uses .%s: launcher and vinehpc.cli use the engine's public interface only"
                           % (rel, line, module, attr))
        if module not in CONFIG_MODULES:
            for line, name in env_reads(path):
                out.append("%s:%d: %s reads $%s: configuration is read in %s only (Settings.from_env)"
                           % (rel, line, module, name, " / ".join(CONFIG_MODULES)))
    return out


def test_the_project_follows_the_layers():
    assert sum(1 for _ in _modules(ROOT)) > 50        # the walk found the tree
    broken = check(ROOT)
    assert not broken, "imports against the layers (see tests/test_layers.py):\n" + "\n".join(broken)


# ------------------------------------------------------------------ the checker itself can fail
SYNTHETIC = {
    "vinehpc/__init__.py": "",
    "vinehpc/__main__.py": "from .cli import main\n",                         # allowed
    "vinehpc/cli.py": "import launcher.pilot\n",                                # allowed: cli is on top
    "vinehpc/config.py": "import os\nX = os.environ.get('VINEHPC_X')\n",     # allowed: the config module
    "vinehpc/manager.py": "def f():\n    from launcher.local import LocalWorkers\n",
    "vinehpc/protocol/__init__.py": "import json\nimport cloudpickle\n",
    "vinehpc/protocol/wire.py": "from . import auth\nfrom ..task import Task\n",
    "vinehpc/core/__init__.py": "",
    "vinehpc/core/state.py": "import collections\nimport threading\nfrom ..comm import conn\n",
    "vinehpc/scheduler/__init__.py": "from .. import server\n",
    "vinehpc/worker/__init__.py": "",
    "vinehpc/worker/main.py": "from .. import config\nfrom ..core import Core\nfrom vinehpc import Manager\n",
    "vinehpc/worker/res.py": "import os\nn = os.environ['SLURM_CPUS_ON_NODE']\nos.environ['VINEHPC_T'] = '1'\n"
                             "e = dict(os.environ)\ne.pop('VINEHPC_SECRET', None)\ns = e.pop('VINEHPC_S')\n",
    "launcher/__init__.py": "",
    "launcher/pilot.py": "from vinehpc.cli import run_script\nfrom mpi4py import MPI\n",
    "launcher/local.py": "class R:\n    def f(self, m):\n        return self._x, m._closed, m.__class__\n",
    "userlevel_net/__init__.py": "",
    "userlevel_net/probe.py": "def f():\n    from vinehpc.task import PythonTask\n",
    "userlevel_net/egress.py": "from vinehpc.protocol import auth, wire\nimport os\n"
                               "g = 'VINEHPC_G' in os.environ\n",
    "sysimage_tools/__init__.py": "",
    "sysimage_tools/selfpack.py": "import importlib\nimportlib.import_module('vinehpc')\nimport mpi4py\n",
    "sysimage_tools/deploy.py": "from .image import read\n",
}

EXPECTED = [
    ("vinehpc/manager.py:2", "launcher.local", "never imports launcher"),
    ("vinehpc/protocol/__init__.py:2", "cloudpickle", "standard library only"),
    ("vinehpc/protocol/wire.py:2", "vinehpc.task", "standard library only"),
    ("vinehpc/core/state.py:2", "threading", "no I/O"),
    ("vinehpc/core/state.py:3", "vinehpc.comm", "no I/O"),
    ("vinehpc/scheduler/__init__.py:1", "vinehpc.server", "no I/O"),
    ("vinehpc/worker/main.py:2", "vinehpc.core", "manager side"),
    ("vinehpc/worker/main.py:3", "vinehpc.manager", "manager side"),
    ("vinehpc/worker/res.py:2", "$SLURM_CPUS_ON_NODE", "Settings.from_env"),
    ("vinehpc/worker/res.py:6", "$VINEHPC_S", "Settings.from_env"),
    ("launcher/pilot.py:1", "vinehpc.cli", "only vinehpc/__main__.py"),
    ("launcher/local.py:3", "._closed", "public interface only"),
    ("userlevel_net/probe.py:2", "vinehpc.task", "at most vinehpc.protocol"),
    ("userlevel_net/egress.py:3", "$VINEHPC_G", "Settings.from_env"),
    ("sysimage_tools/selfpack.py:2", "imports vinehpc:", "at most vinehpc.protocol"),
    ("sysimage_tools/selfpack.py:3", "mpi4py", "inside launcher/ only"),
]


@pytest.fixture
def synthetic(tmp_path):
    for rel, text in SYNTHETIC.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return str(tmp_path)


def test_the_checker_finds_every_kind_of_violation(synthetic):
    broken = check(synthetic)
    for where, what, rule in EXPECTED:
        hits = [b for b in broken if b.startswith(where + ":") and what in b and rule in b]
        assert hits, "not reported: %s %s (%s); reported:\n%s" % (where, what, rule, "\n".join(broken))
    # and nothing else: the allowed imports and the setting of a child's variable are not reported
    assert len(broken) == len(EXPECTED), "\n".join(broken)
