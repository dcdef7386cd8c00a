"""Static import analysis: what a program needs from the Python environment.

`analyze("tasks.py")` parses tasks.py and every local module it imports (files next to it,
followed through absolute and relative imports), never running any of them, and maps the
other imports to the installed distributions that provide them, plus those distributions'
dependencies (installed ones; extras are not followed).  The result is a spec: plain JSON
that the user may edit and give back with `vinehpc sysimage python --spec FILE`.
"""
from __future__ import annotations

import ast
import importlib.metadata as md
import os
import re
import sys

SPEC_VERSION = 1


def _stdlib_names() -> set:
    names = set(sys.builtin_module_names) | {"__future__", "__main__"}
    if hasattr(sys, "stdlib_module_names"):
        return names | set(sys.stdlib_module_names)
    stdlib = os.path.dirname(os.__file__)             # Python 3.9: list the directory
    for d in (stdlib, os.path.join(stdlib, "lib-dynload")):
        for n in os.listdir(d) if os.path.isdir(d) else ():
            if n != "site-packages":
                names.add(n.split(".")[0])
    return names


def canonical(name: str) -> str:
    """PEP 503 normalized distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def imports_of(source: str, filename: str = "<string>") -> list:
    """(level, module, names) for every import statement in `source`, and for
    importlib.import_module("x") / __import__("x") calls with a literal name."""
    out = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            out.extend((0, a.name, []) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            out.append((node.level, node.module or "", [a.name for a in node.names]))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
            if name in ("__import__", "import_module") and not node.args[0].value.startswith("."):
                out.append((0, node.args[0].value, []))
    return out


class _Program:
    def __init__(self, script):
        self.base = os.path.dirname(os.path.abspath(script))

    def local(self, dotted):
        """The file (or namespace directory) of local module `dotted`, or None."""
        p = os.path.join(self.base, *dotted.split("."))
        if os.path.isfile(os.path.join(p, "__init__.py")):
            return os.path.join(p, "__init__.py")
        if os.path.isfile(p + ".py"):
            return p + ".py"
        if os.path.isdir(p) and any(n.endswith(".py") for n in os.listdir(p)):
            return p
        return None

    def package_of(self, path):
        """The package a file's relative imports start from: pkg/sub/mod.py and
        pkg/sub/__init__.py are both in pkg.sub; tasks.py is in the top level."""
        return os.path.relpath(path, self.base).split(os.sep)[:-1]


def analyze(script: str) -> dict:
    """The spec (a JSON-able dict) for the program `script`; see the module docstring."""
    if not os.path.isfile(script):
        raise FileNotFoundError("no such file: %s" % script)
    prog = _Program(script)
    stdlib = _stdlib_names()
    queue, seen_files = [os.path.abspath(script)], set()
    third = {}          # top-level import name -> set of dotted names used
    while queue:
        path = queue.pop()
        if path in seen_files:
            continue
        seen_files.add(path)
        if os.path.isdir(path):
            continue
        with open(path, "rb") as f:
            src = f.read()
        try:
            found = imports_of(src, path)
        except SyntaxError as e:
            raise SyntaxError("cannot analyze %s: %s" % (path, e)) from None
        pkg = prog.package_of(path)
        for level, module, names in found:
            if level:
                base = pkg[:len(pkg) - (level - 1)] if level - 1 <= len(pkg) else None
                if base is None:
                    continue
                mod = ".".join(base + ([module] if module else []))
                cands = [mod] + [mod + "." + n for n in names if n != "*"] if mod else \
                    [n for n in names if n != "*"]
                for c in cands:
                    _queue_local(prog, c, queue)
                continue
            top = module.split(".")[0]
            if prog.local(top) is not None:
                for c in [module] + [module + "." + n for n in names if n != "*"]:
                    _queue_local(prog, c, queue)
            elif top not in stdlib and top:
                third.setdefault(top, set()).add(module)
    local = sorted(os.path.relpath(p, prog.base) for p in seen_files if p != os.path.abspath(script))
    imports, unresolved, wanted = _map_to_distributions(third)
    packages = _closure(wanted)
    return {
        "spec_version": SPEC_VERSION,
        "program": os.path.basename(script),
        "python": python_tag(),
        "local_modules": local,
        "imports": imports,
        "unresolved": unresolved,
        "packages": packages,
        "comment": ("Edit 'packages' (distribution name -> exact version) and build with "
                    "`vinehpc sysimage python --spec THIS_FILE -o env.vimg`: a package installed here at that "
                    "version is copied from this environment, any other is pip-installed. Local modules (next "
                    "to the program) are listed for information; they are not packed."),
    }


def _queue_local(prog, dotted, queue):
    parts = dotted.split(".")
    for i in range(1, len(parts) + 1):
        p = prog.local(".".join(parts[:i]))
        if p is not None:
            queue.append(os.path.abspath(p))


def python_tag() -> dict:
    import platform
    import sysconfig
    return {"implementation": sys.implementation.name, "version": platform.python_version(),
            "cache_tag": sys.implementation.cache_tag, "platform": sysconfig.get_platform()}


def _packages_distributions() -> dict:
    if hasattr(md, "packages_distributions"):
        return md.packages_distributions()
    out = {}                                           # Python 3.9
    for d in md.distributions():
        tops = (d.read_text("top_level.txt") or "").split()
        if not tops:
            tops = {str(f).split("/")[0].split(".")[0] for f in d.files or () if "/" in str(f) or
                    str(f).endswith(".py")}
        for t in tops:
            out.setdefault(t, []).append(d.metadata["Name"])
    return out


def _map_to_distributions(third: dict):
    pd = _packages_distributions()
    imports, unresolved, wanted = {}, [], set()
    for top in sorted(third):
        dists = list(dict.fromkeys(pd.get(top, [])))
        if len(dists) > 1:                             # a namespace package: which dists provide what we use
            used = {m.replace(".", "/") for m in third[top]}
            hit = [d for d in dists if any(str(f).startswith(tuple(u + "/" for u in used)) or
                                           str(f).split(".")[0] in used for f in md.distribution(d).files or ())]
            dists = hit or dists
        imports[top] = dists
        if dists:
            wanted.update(dists)
        else:
            unresolved.append(top)
    return imports, unresolved, wanted


_REQ = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def _closure(names) -> dict:
    """{distribution name: version} for `names` and their installed dependencies."""
    out, queue = {}, list(names)
    while queue:
        name = queue.pop()
        try:
            d = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        real = d.metadata["Name"]
        if canonical(real) in {canonical(k) for k in out}:
            continue
        out[real] = d.version
        for req in d.requires or ():
            spec, _, marker = req.partition(";")
            if "extra" in marker:
                continue                      # optional features are not followed
            m = _REQ.match(spec)
            if m:
                queue.append(m.group(1))      # not installed here -> not needed here: skipped above
    return dict(sorted(out.items(), key=lambda kv: canonical(kv[0])))
