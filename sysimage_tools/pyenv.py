"""Python environment images: build a .vimg from requirements, package names, a venv or a spec.

Image layout (relative to the unpacked root):

    site/                     the distributions (what PYTHONPATH points at), with
                              __pycache__/*.pyc compiled with UNCHECKED_HASH invalidation:
                              imports never compare source mtimes or read the sources
    boot/sitecustomize.py     runs first in every interpreter inside the image: refuses a
                              python of another ABI, processes site/*.pth, and strips sys.path
                              to the image plus the interpreter's standard library
    bin/                      console scripts of the packed distributions (#!/usr/bin/env python3)

Building is done by the interpreter that will run the image (same cache tag and platform):
byte-code and compiled extensions are only valid for one ABI, so packing a venv whose python
differs is refused.
"""
from __future__ import annotations

import configparser
import datetime
import importlib.metadata as md
import inspect
import json
import os
import platform
import posixpath
import shutil
import subprocess
import sys
import tempfile

from . import analyze as _analyze
from . import image

LAYOUT = {"pythonpath": ["boot", "site"], "bin": "bin"}
SKIP_FROM_VENV = ("pip",)       # the installer is not part of a run-time environment


def _abi() -> dict:
    import platform
    import sys
    import sysconfig
    paths = sysconfig.get_paths()
    return {"implementation": sys.implementation.name, "version": platform.python_version(),
            "cache_tag": sys.implementation.cache_tag, "soabi": sysconfig.get_config_var("SOABI"),
            "platform": sysconfig.get_platform(), "machine": platform.machine(),
            "purelib": paths["purelib"], "platlib": paths["platlib"], "executable": sys.executable}


def python_info(executable=None) -> dict:
    """ABI facts of `executable` (default: this interpreter): cache tag, SOABI, platform, ..."""
    if executable is None:
        return _abi()
    code = "import json\n" + inspect.getsource(_abi) + "print(json.dumps(_abi()))\n"
    try:
        out = subprocess.run([executable, "-I", "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise image.ImageError("cannot run %s: %s" % (executable, getattr(e, "strerror", None) or e)) from None
    if out.returncode != 0:
        raise image.ImageError("cannot run %s: exit %d: %s" % (executable, out.returncode, out.stderr.strip()[-500:]))
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise image.ImageError("cannot read the ABI of %s: %r" % (executable, out.stdout[-300:])) from None


ABI_KEYS = ("implementation", "cache_tag", "soabi", "platform")


def check_same_abi(theirs: dict, what: str) -> None:
    mine = python_info()
    diff = [k for k in ABI_KEYS if theirs.get(k) != mine.get(k)]
    if diff:
        raise image.ImageError(
            "refusing to build: %s is %s %s (%s, %s) but this vinehpc runs on %s %s (%s, %s); byte-code and "
            "compiled modules work only with the interpreter they were made for: run the build with that "
            "python: %s -m vinehpc sysimage python ..."
            % (what, theirs.get("implementation"), theirs.get("version"), theirs.get("cache_tag"),
               theirs.get("platform"), mine["implementation"], mine["version"], mine["cache_tag"],
               mine["platform"], theirs.get("executable") or "that-python"))


# ---------------------------------------------------------------------------------- filling site/
def pip_install(site: str, *, requirements=None, packages=(), no_deps=False, log=None) -> None:
    """pip install --target `site` with this interpreter (so the ABI matches by construction)."""
    cmd = [sys.executable, "-m", "pip", "install", "--target", site, "--no-compile", "--no-warn-script-location",
           "--disable-pip-version-check", "--no-input", "-q"]
    if no_deps:
        cmd.append("--no-deps")
    if requirements:
        cmd += ["-r", requirements]
    cmd += list(packages)
    if log:
        log("running: %s" % " ".join(cmd))
    env = dict(os.environ, PIP_BREAK_SYSTEM_PACKAGES="1")
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    except OSError as e:
        raise image.ImageError("cannot run pip: %s" % e) from None
    if p.returncode != 0:
        raise image.ImageError("pip install failed (exit %d):\n%s" % (p.returncode, p.stdout.strip()[-3000:]))
    shutil.rmtree(os.path.join(site, "bin"), ignore_errors=True)   # scripts: we write our own


def _skip(rel: str) -> bool:
    parts = rel.split("/")
    return ("__pycache__" in parts or rel.endswith((".pyc", ".pyo")) or parts[0].startswith("__editable__")
            or rel.endswith(".egg-link"))


def copy_tree(src: str, dst: str, *, skip_top=()) -> None:
    """Copy `src` to `dst` without byte-code caches (and without top-level names in skip_top)."""
    for dirpath, dirnames, filenames in os.walk(src):
        rel_dir = os.path.relpath(dirpath, src)
        rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
        keep = []
        for d in dirnames:
            if d == "__pycache__" or (not rel_dir and _top_name(d) in skip_top):
                continue
            if os.path.islink(os.path.join(dirpath, d)):
                _copy_one(os.path.join(dirpath, d), os.path.join(dst, rel_dir + d))
                continue
            keep.append(d)
        dirnames[:] = keep
        os.makedirs(os.path.join(dst, rel_dir), exist_ok=True)
        for f in filenames:
            if _skip(rel_dir + f) or (not rel_dir and _top_name(f) in skip_top):
                continue
            _copy_one(os.path.join(dirpath, f), os.path.join(dst, rel_dir + f))


def _top_name(entry: str) -> str:
    """'pip-24.0.dist-info' -> 'pip', 'six.py' -> 'six', 'pip' -> 'pip'."""
    if entry.endswith((".dist-info", ".egg-info")):
        return entry.rsplit("-", 1)[0] if "-" in entry else entry.split(".")[0]
    return entry.split(".")[0]


def _copy_one(src, dst):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if os.path.islink(src):
        target = os.readlink(src)
        if os.path.isabs(target) or target.startswith(".."):
            shutil.copy2(src, dst)        # a link out of the tree: take the file itself
        else:
            os.symlink(target, dst)
    else:
        shutil.copy2(src, dst)


def copy_distribution(dist: md.Distribution, site: str, *, locate=None) -> list:
    """Copy an installed distribution's files (its RECORD) into `site`; returns warnings.

    Files outside site-packages (scripts in bin/) are left out.  For an editable install,
    whose code lives elsewhere, the packages it provides are copied from where they import
    (`locate(names)` -> {name: path}; default: this interpreter's import system)."""
    warnings = []
    tops = set()
    for f in dist.files or ():
        rel = str(f).replace(os.sep, "/")
        if rel.startswith("../") or "/../" in rel or posixpath.isabs(rel) or _skip(rel):
            continue
        src = dist.locate_file(f)
        if os.path.isfile(src):
            _copy_one(os.fspath(src), os.path.join(site, rel))
            tops.add(rel.split("/")[0].split(".")[0])
    declared = (dist.read_text("top_level.txt") or "").split() if is_editable(dist) else []
    missing = [t for t in declared if t not in tops]
    if missing:
        where = (locate or _locate_here)(missing)
        for name in missing:
            p = where.get(name)
            if not p:
                warnings.append("%s provides %s but it cannot be found; left out" % (dist.metadata["Name"], name))
                continue
            if os.path.isdir(p):
                copy_tree(p, os.path.join(site, name))
            else:
                _copy_one(p, os.path.join(site, os.path.basename(p)))
            warnings.append("%s is an editable install: copied %s from %s" % (dist.metadata["Name"], name, p))
    return warnings


def is_editable(dist: md.Distribution) -> bool:
    """An editable (development) install: its code lives outside site-packages."""
    try:
        info = json.loads(dist.read_text("direct_url.json") or "{}")
    except ValueError:
        info = {}
    if (info.get("dir_info") or {}).get("editable"):
        return True
    return any(str(f).startswith("__editable__") or str(f).endswith(".egg-link") for f in dist.files or ())


def _locate_here(names) -> dict:
    import importlib.util
    out = {}
    for n in names:
        try:
            spec = importlib.util.find_spec(n)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            continue
        if spec.submodule_search_locations:
            out[n] = list(spec.submodule_search_locations)[0]
        elif spec.origin and os.path.isfile(spec.origin):
            out[n] = spec.origin
    return out


def copy_venv(venv: str, site: str, log=None) -> dict:
    """Copy the site-packages of the venv at `venv` into `site`; returns the venv python's info."""
    py = os.path.join(venv, "bin", "python")
    if not os.path.exists(py):
        raise image.ImageError("%s is not a virtual environment (no bin/python)" % venv)
    info = python_info(py)
    check_same_abi(info, "the venv's python (%s)" % py)
    dirs = list(dict.fromkeys(os.path.realpath(info[k]) for k in ("purelib", "platlib")))
    for d in dirs:
        if os.path.isdir(d):
            copy_tree(d, site, skip_top=SKIP_FROM_VENV)
    # editable installs of the venv: their code is outside it; ask the venv's python where it is
    for dist in md.distributions(path=[site]):
        declared = (dist.read_text("top_level.txt") or "").split() if is_editable(dist) else []
        missing = [t for t in declared if not _present(site, t)]
        if missing:
            where = _locate_with(py, missing)
            for name in missing:
                p = where.get(name)
                if p and os.path.isdir(p):
                    copy_tree(p, os.path.join(site, name))
                elif p:
                    _copy_one(p, os.path.join(site, os.path.basename(p)))
                if log:
                    log("%s: %s %s" % (dist.metadata["Name"], name, "copied from %s (editable install)" % p
                                       if p else "not found; left out"))
    return info


def _present(site, name):
    return os.path.isdir(os.path.join(site, name)) or any(
        n.split(".")[0] == name for n in os.listdir(site) if os.path.isfile(os.path.join(site, n)))


def _locate_with(python, names) -> dict:
    code = ("import importlib.util, json, sys\nout = {}\nfor n in sys.argv[1:]:\n"
            "    try:\n        s = importlib.util.find_spec(n)\n    except Exception:\n        s = None\n"
            "    if s is not None:\n        out[n] = list(s.submodule_search_locations)[0] if "
            "s.submodule_search_locations else s.origin\nprint(json.dumps(out))")
    p = subprocess.run([python, "-c", code] + list(names), stdout=subprocess.PIPE, text=True, timeout=60)
    try:
        return json.loads(p.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {}


def install_spec(spec: dict, site: str, log=None) -> None:
    """Fill `site` with spec["packages"]: copied from this environment when installed here at
    exactly that version, pip-installed (without dependencies: the spec lists them) otherwise."""
    pk = spec.get("packages")
    if not isinstance(pk, dict):
        raise image.ImageError("the spec has no 'packages' object (distribution name -> version)")
    want_py = spec.get("python") or {}
    if want_py.get("cache_tag") and want_py["cache_tag"] != sys.implementation.cache_tag and log:
        log("warning: the spec was written for %s; building for this interpreter (%s)"
            % (want_py["cache_tag"], sys.implementation.cache_tag))
    to_pip = []
    for name, version in pk.items():
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            dist = None
        if dist is not None and (version is None or dist.version == version):
            for w in copy_distribution(dist, site):
                if log:
                    log(w)
        else:
            to_pip.append("%s==%s" % (name, version) if version else name)
    if to_pip:
        pip_install(site, packages=to_pip, no_deps=True, log=log)


# ---------------------------------------------------------------------------------- finishing
def installed(site: str) -> dict:
    """{distribution name: version} of the distributions in `site`."""
    out = {}
    for d in md.distributions(path=[site]):
        name = d.metadata["Name"]
        if name:
            out[name] = d.version
    return dict(sorted(out.items(), key=lambda kv: kv[0].lower()))


def write_console_scripts(site: str, bindir: str) -> list:
    """bin/NAME for every console_scripts entry point in `site`; returns the names."""
    names = []
    for d in md.distributions(path=[site]):
        text = d.read_text("entry_points.txt")
        if not text:
            continue
        cp = configparser.ConfigParser(delimiters=("=",), interpolation=None)
        cp.optionxform = str
        try:
            cp.read_string(text)
        except configparser.Error:
            continue
        if not cp.has_section("console_scripts"):
            continue
        for name, value in cp.items("console_scripts"):
            if "/" in name or ":" not in value:
                continue
            module, _, attr = value.split("[")[0].strip().partition(":")
            os.makedirs(bindir, exist_ok=True)
            path = os.path.join(bindir, name)
            with open(path, "w") as f:
                f.write("#!/usr/bin/env python3\n# %s's console script, written by vinehpc sysimage\n"
                        "import importlib, sys\nobj = importlib.import_module(%r)\nfor a in %r.split('.'):\n"
                        "    obj = getattr(obj, a)\nsys.exit(obj())\n" % (d.metadata["Name"], module.strip(),
                                                                           attr.strip()))
            os.chmod(path, 0o755)
            names.append(name)
    return sorted(names)


SITECUSTOMIZE = '''\
"""Written by vinehpc sysimage: runs at the start of every Python inside this image.

It refuses an interpreter of another ABI than the image was built for, processes the
image's .pth files, and leaves on sys.path only the image's directories (PYTHONPATH as
vinehpc set it) and the interpreter's standard library: no site-packages, no user site,
nothing from a shared filesystem.  Import hooks that other site-packages' .pth files
installed before us are removed for the same reason."""
import os
import sys

_WANT = %(want)r


def _vinehpc_image():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if sys.implementation.cache_tag != _WANT["cache_tag"] or os.uname().machine != _WANT["machine"]:
        sys.stderr.write("vinehpc image %%s: built for %%s on %%s (Python %%s), but this interpreter (%%s) is "
                         "%%s on %%s: run it with a matching python3\\n"
                         %% (root, _WANT["cache_tag"], _WANT["machine"], _WANT["version"], sys.executable,
                            sys.implementation.cache_tag, os.uname().machine))
        sys.stderr.flush()
        os._exit(2)
    given = [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    import site
    for p in given:
        if p.startswith(root + os.sep) and os.path.basename(p) == "site":
            site.addsitedir(p)
    stdlib = os.path.dirname(os.path.abspath(os.__file__))
    roots = [root] + given

    def inside(p):
        a = os.path.abspath(p)
        if any(a == r or a.startswith(r + os.sep) for r in roots):
            return True
        if a == stdlib or a.startswith(stdlib + os.sep):    # but not its site-packages
            return a[len(stdlib) + 1:].split(os.sep)[0] not in ("site-packages", "dist-packages")
        return a.endswith(".zip") and os.path.dirname(a) == os.path.dirname(stdlib)

    sys.path[:] = [p for p in sys.path if p and inside(p)]
    sys.path_importer_cache.clear()

    def foreign(obj):
        f = getattr(sys.modules.get(getattr(obj, "__module__", None) or ""), "__file__", None)
        return f is not None and not inside(f)

    sys.meta_path[:] = [f for f in sys.meta_path if not foreign(f)]
    sys.path_hooks[:] = [h for h in sys.path_hooks if not foreign(h)]


_vinehpc_image()
del _vinehpc_image
'''


def write_boot(bootdir: str, info: dict) -> None:
    os.makedirs(bootdir, exist_ok=True)
    want = {k: info[k] for k in ("cache_tag", "machine", "version")}
    with open(os.path.join(bootdir, "sitecustomize.py"), "w") as f:
        f.write(SITECUSTOMIZE % {"want": want})


def compile_tree(path: str) -> bool:
    """Byte-compile every .py below `path` with unchecked-hash pycs (no mtime checks at import)."""
    import compileall
    import py_compile
    import io
    import contextlib
    with contextlib.redirect_stdout(io.StringIO()):
        return compileall.compile_dir(path, quiet=2, force=True, workers=0, stripdir=path, prependdir="/vinehpc-image",
                                      invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def created_by() -> str:
    try:
        return "vinehpc " + md.version("vinehpc")
    except md.PackageNotFoundError:
        return "vinehpc"


def finish(stage: str, out: str, *, source: dict, command, level: int = 10) -> image.Manifest:
    """Turn a staging dir holding site/ into the image `out`."""
    site = os.path.join(stage, "site")
    info = python_info()
    scripts = write_console_scripts(site, os.path.join(stage, "bin"))
    write_boot(os.path.join(stage, "boot"), info)
    compile_tree(site)
    compile_tree(os.path.join(stage, "boot"))
    meta = {
        "kind": "python",
        "created": _now(), "created_by": created_by(), "command": list(command or sys.argv),
        "host": platform.node(),
        "python": {k: info[k] for k in ("implementation", "version", "cache_tag", "soabi", "platform", "machine")},
        "bytecode": "unchecked-hash",
        "packages": installed(site),
        "console_scripts": scripts,
        "source": source,
        "layout": LAYOUT,
    }
    return image.build(out, stage, meta, level=level)


def build(out: str, *, requirements=None, packages=None, venv=None, spec=None, analyze=None,
          spec_out=None, spec_only=False, level: int = 10, command=None, log=None):
    """Build a Python image at `out` from exactly one source; see `vinehpc sysimage python -h`.

    With `analyze` (a program) the spec is written to `spec_out` (default OUT.spec.json)
    first; with spec_only nothing else is done.  Returns the Manifest (None if spec_only)."""
    given = [x for x in (requirements, packages, venv, spec, analyze) if x]
    if len(given) != 1:
        raise ValueError("give exactly one of -r FILE, --packages, --venv, --spec, --analyze")
    log = log or (lambda msg: None)
    source = {}
    if analyze:
        sp = _analyze.analyze(analyze)
        spec_out = spec_out or _default_spec_path(out)
        with open(spec_out, "w") as f:
            json.dump(sp, f, indent=2)
            f.write("\n")
        log("wrote the spec to %s: %d packages (%s)%s" % (
            spec_out, len(sp["packages"]), ", ".join("%s %s" % kv for kv in sp["packages"].items()) or "none",
            "; unresolved imports: %s" % ", ".join(sp["unresolved"]) if sp["unresolved"] else ""))
        if spec_only:
            return None
        spec, source = sp, {"analyze": analyze, "spec": spec_out}
    elif isinstance(spec, str):
        source = {"spec": spec}
        try:
            with open(spec) as f:
                spec = json.load(f)
        except (OSError, ValueError) as e:
            raise image.ImageError("cannot read the spec %s: %s" % (source["spec"], e)) from None
    stage = tempfile.mkdtemp(prefix="vinehpc-build-")
    try:
        site = os.path.join(stage, "site")
        os.makedirs(site)
        if requirements:
            source = {"requirements": requirements}
            pip_install(site, requirements=requirements, log=log)
        elif packages:
            source = {"packages": list(packages)}
            pip_install(site, packages=packages, log=log)
        elif venv:
            source = {"venv": os.path.abspath(venv)}
            copy_venv(venv, site, log=log)
        else:
            install_spec(spec, site, log=log)
        return finish(stage, out, source=source, command=command, level=level)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _default_spec_path(out: str) -> str:
    base = out[:-5] if out.endswith(".vimg") else out
    return base + ".spec.json"
