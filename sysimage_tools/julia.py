"""`vinehpc sysimage julia modules.jl -o sys.vimg`: a PackageCompiler sysimage, wrapped as an image.

1. parse_modules() reads the `using`/`import` statements of modules.jl (and of the files it
   include()s), without running Julia: packages, standard libraries, local modules;
2. driver_script() writes the Julia program that adds the packages to a fresh project,
   calls PackageCompiler.create_sysimage(...; cpu_target="generic") and copies the packages'
   sources and artifacts into the image's depot;
3. build() runs it with `julia` (which must be on PATH, or --julia) and packs the result:

    sysimage/sys.<so|dylib>   the sysimage
    project/                  Project.toml + Manifest.toml (JULIA_PROJECT at run time)
    depot/                    packages/ and artifacts/ the sysimage refers to
    bin/julia                 wrapper: the real julia (next on PATH) with --sysimage=<image>
    build_sysimage.jl         the driver script, for reference

At run time (deploy.LocalEnv.env_for) JULIA_DEPOT_PATH is a writable node-local depot followed
by the image's depot, JULIA_LOAD_PATH=@:@stdlib (no walk through ~/.julia), and bin/julia is
first on PATH.  Julia cannot be installed on our CI machines: the parser and the script are
tested for real, the build/run plumbing with a stand-in `julia`, and the full build only where
a real julia is on PATH.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile

from . import image

STDLIBS = frozenset("""
ArgTools Artifacts Base64 CRC32c Dates Distributed Downloads FileWatching Future InteractiveUtils
LazyArtifacts LibCURL LibGit2 Libdl LinearAlgebra Logging Markdown Mmap NetworkOptions Pkg Printf
Profile REPL Random SHA Serialization SharedArrays Sockets SparseArrays Statistics StyledStrings
SuiteSparse TOML Tar Test UUIDs Unicode JuliaSyntaxHighlighting
""".split())
BUILTIN = frozenset(("Base", "Core", "Main"))
_IDENT = r"[A-Za-z_][A-Za-z0-9_!]*"
_CHAR = re.compile(r"'(?:\\.[^']{0,9}|[^\\'])'")


def strip_comments(text: str) -> str:
    """`text` without # line comments and nested #= =# block comments (strings kept)."""
    out, i, n, depth = [], 0, len(text), 0
    in_str = None
    while i < n:
        c = text[i]
        if depth:
            if text.startswith("#=", i):
                depth, i = depth + 1, i + 2
            elif text.startswith("=#", i):
                depth, i = depth - 1, i + 2
            else:
                if c == "\n":
                    out.append(c)
                i += 1
            continue
        if in_str:
            if c == "\\":
                out.append(text[i:i + 2])
                i += 2
                continue
            if text.startswith(in_str, i):
                out.append(in_str)
                i += len(in_str)
                in_str = None
                continue
            out.append(c)
            i += 1
            continue
        if c == "'" and not (out and re.match(r"[\w)\]}'.]", out[-1][-1:])):   # a Char, not an adjoint
            m = _CHAR.match(text, i)
            if m:
                out.append(m.group(0))
                i = m.end()
                continue
        if text.startswith("#=", i):
            depth, i = 1, i + 2
        elif c == "#":
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif c == '"':
            in_str = '"""' if text.startswith('"""', i) else '"'
            out.append(in_str)
            i += len(in_str)
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _blank_strings(text: str) -> str:
    return re.sub(r'"""(?:\\.|[^\\])*?"""|"(?:\\.|[^"\\\n])*"', '""', text, flags=re.S)


def statements(text: str) -> list:
    """('using'|'import', clause) for every using/import statement in Julia source `text`."""
    code = _blank_strings(strip_comments(text))
    out = []
    for m in re.finditer(r"(?<![\w.@!])(using|import)\s+", code):
        start = m.end()
        end = start
        while True:                         # a trailing comma continues on the next line
            nl = code.find("\n", end)
            line_end = len(code) if nl < 0 else nl
            semi = code.find(";", end, line_end)
            if semi >= 0:
                end = semi
                break
            end = line_end
            if code[start:end].rstrip().endswith(",") and nl >= 0:
                end = nl + 1
                continue
            break
        out.append((m.group(1), " ".join(code[start:end].split())))
    return out


def modules_of(clause: str) -> list:
    """Top-level module names a using/import clause loads: 'A, B.C' -> [A, B]; 'A: f, g' -> [A];
    relative ones ('.Local') come back with their leading dots."""
    head = clause.split(":", 1)[0] if re.search(r"(?<!:):(?!:)", clause) else clause
    names = []
    for item in head.split(","):
        item = re.sub(r"\s+as\s+%s\s*$" % _IDENT, "", item.strip())
        m = re.match(r"(\.*)(%s)" % _IDENT, item)
        if m:
            names.append(m.group(1) + m.group(2))
    return names


def parse_modules(path: str) -> dict:
    """What `path` (and the files it include()s) loads: {"packages", "stdlibs", "local", "files"}."""
    packages, stdlibs, local, files = [], [], [], []
    queue = [os.path.abspath(path)]
    while queue:
        p = queue.pop(0)
        if p in files:
            continue
        files.append(p)
        with open(p, encoding="utf-8") as f:
            text = f.read()
        for inc in re.findall(r'(?<![\w.])include\(\s*"([^"$]+)"\s*\)', strip_comments(text)):
            q = os.path.normpath(os.path.join(os.path.dirname(p), inc))
            if os.path.isfile(q):
                queue.append(q)
        for _, clause in statements(text):
            for name in modules_of(clause):
                if name.startswith("."):
                    bucket = local
                    name = name.lstrip(".")
                elif name in BUILTIN:
                    continue
                elif name in STDLIBS:
                    bucket = stdlibs
                else:
                    bucket = packages
                if name not in bucket:
                    bucket.append(name)
    return {"packages": packages, "stdlibs": stdlibs, "local": local, "files": files}


def jl_str(s: str) -> str:
    """A Julia string literal for `s`."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$") + '"'


def _jl_vec(xs) -> str:
    return "String[" + ", ".join(jl_str(x) for x in xs) + "]"


def driver_script(packages, *, source, project, sysimage, depot, packages_out, precompile_files=(),
                  cpu_target="generic") -> str:
    """The Julia program that builds the sysimage (see the module docstring)."""
    return DRIVER % {
        "source": source, "packages": _jl_vec(packages), "project": jl_str(project),
        "sysimage": jl_str(sysimage), "depot": jl_str(depot), "packages_out": jl_str(packages_out),
        "precompile": _jl_vec(precompile_files), "cpu_target": jl_str(cpu_target),
    }


DRIVER = r'''# Generated by `vinehpc sysimage julia` from %(source)s.
# Builds a PackageCompiler sysimage for cpu_target="generic" (any node of the architecture) and
# copies the packages' sources and artifacts into the image's depot.
const PACKAGES = %(packages)s
const PROJECT = %(project)s
const SYSIMAGE = %(sysimage)s
const DEPOT = %(depot)s
const PACKAGES_OUT = %(packages_out)s
const PRECOMPILE_FILES = %(precompile)s
const CPU_TARGET = %(cpu_target)s

import Pkg
import TOML

Pkg.activate(PROJECT)
let have = Set(keys(Pkg.project().dependencies)), need = filter(p -> !(p in have), PACKAGES)
    isempty(need) || Pkg.add(need)
end
Pkg.instantiate()

if Base.find_package("PackageCompiler") === nothing
    Pkg.activate(; temp=true)          # PackageCompiler is a build tool, not part of the image
    Pkg.add("PackageCompiler")
end
using PackageCompiler
Pkg.activate(PROJECT)

PackageCompiler.create_sysimage(Symbol.(PACKAGES); sysimage_path=SYSIMAGE, project=PROJECT,
                                cpu_target=CPU_TARGET, precompile_execution_file=PRECOMPILE_FILES)

function find_artifact(h)
    for d in Base.DEPOT_PATH
        p = joinpath(d, "artifacts", h)
        isdir(p) && return p
    end
    return nothing
end

mkpath(joinpath(DEPOT, "packages"))
mkpath(joinpath(DEPOT, "artifacts"))
open(PACKAGES_OUT, "w") do io
    for (uuid, info) in Pkg.dependencies()
        info.is_direct_dep && println(io, info.name, "\t", info.version === nothing ? "" : string(info.version))
        (info.source === nothing || !isdir(info.source)) && continue
        dest = joinpath(DEPOT, "packages", info.name, basename(info.source))
        isdir(dest) || cp(info.source, dest)
        toml = joinpath(info.source, "Artifacts.toml")
        isfile(toml) || continue
        for (name, meta) in TOML.parsefile(toml), m in (meta isa AbstractVector ? meta : [meta])
            h = get(m, "git-tree-sha1", nothing)
            src = h === nothing ? nothing : find_artifact(h)
            src === nothing && continue
            dst = joinpath(DEPOT, "artifacts", h)
            isdir(dst) || cp(src, dst)
        end
    end
    println(io, "julia\t", VERSION)
end
'''

WRAPPER = r'''#!/bin/sh
# Written by vinehpc sysimage: the real julia (the next one on PATH) with this image's sysimage.
here=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)
root=$(dirname -- "$here")
real=
IFS=:
for d in $PATH; do
    if [ "$d" != "$here" ] && [ -x "$d/julia" ] && [ ! "$d/julia" -ef "$0" ]; then real=$d/julia; break; fi
done
unset IFS
if [ -z "$real" ]; then
    echo "vinehpc image $root: no julia on PATH (besides this wrapper); load your site's julia module" >&2
    exit 127
fi
exec "$real" --sysimage="$root/%(sysimage)s" "$@"
'''


def sysimage_name() -> str:
    return "sys.dylib" if sys.platform == "darwin" else "sys.dll" if os.name == "nt" else "sys.so"


def julia_version(julia: str) -> str:
    p = subprocess.run([julia, "--version"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=120)
    m = re.search(r"(\d+\.\d+\.\d+\S*)", p.stdout)
    return m.group(1) if m else p.stdout.strip()


def build(source: str, out: str, *, julia=None, project=None, precompile=(), script_only=None,
          level: int = 10, command=None, log=None):
    """Build the sysimage image `out` from the Julia file `source`; see the module docstring.

    With `script_only` (a path), write the driver script there and stop (returns None)."""
    from . import pyenv
    log = log or (lambda msg: None)
    mods = parse_modules(source)
    log("%s loads packages: %s%s" % (source, ", ".join(mods["packages"]) or "none",
                                     "; standard libraries: %s" % ", ".join(mods["stdlibs"]) if mods["stdlibs"] else ""))
    if script_only:
        text = driver_script(mods["packages"], source=source, project="project", sysimage="sysimage/" + sysimage_name(),
                             depot="depot", packages_out="packages.tsv",
                             precompile_files=[os.path.abspath(p) for p in precompile])
        with open(script_only, "w") as f:
            f.write(text)
        log("wrote %s (paths relative to the directory it runs in)" % script_only)
        return None
    exe = julia or shutil.which("julia")
    if not exe or not shutil.which(exe):
        raise image.ImageError("julia not found%s: put Julia on PATH (e.g. `module load julia`) or pass --julia PATH; "
                               "--script-only FILE writes the driver script without running it"
                               % (" at %s" % julia if julia else " on PATH"))
    exe = shutil.which(exe)
    stage = tempfile.mkdtemp(prefix="vinehpc-julia-")
    build_depot = tempfile.mkdtemp(prefix="vinehpc-julia-depot-")
    try:
        proj = os.path.join(stage, "project")
        os.makedirs(proj)
        if project:
            for name in ("Project.toml", "Manifest.toml", "JuliaProject.toml", "JuliaManifest.toml"):
                if os.path.isfile(os.path.join(project, name)):
                    shutil.copyfile(os.path.join(project, name), os.path.join(proj, name))
        os.makedirs(os.path.join(stage, "sysimage"))
        sysimage = os.path.join(stage, "sysimage", sysimage_name())
        tsv = os.path.join(build_depot, "packages.tsv")
        script = os.path.join(stage, "build_sysimage.jl")
        with open(script, "w") as f:
            f.write(driver_script(mods["packages"], source=source, project=proj, sysimage=sysimage,
                                  depot=os.path.join(stage, "depot"), packages_out=tsv,
                                  precompile_files=[os.path.abspath(p) for p in precompile]))
        env = dict(os.environ, JULIA_DEPOT_PATH=build_depot + os.pathsep)   # trailing ':' = then the defaults
        env.pop("JULIA_PROJECT", None)
        log("running %s %s (a sysimage build takes minutes)" % (exe, script))
        rc = subprocess.call([exe, "--startup-file=no", "--history-file=no", script], env=env)
        if rc != 0 or not os.path.isfile(sysimage):
            kept = os.path.join(tempfile.gettempdir(), "vinehpc-build_sysimage-%d.jl" % os.getpid())
            shutil.copyfile(script, kept)
            raise image.ImageError("julia failed to build the sysimage (exit %d); the driver script is kept at %s"
                                   % (rc, kept))
        packages = {}
        jversion = julia_version(exe)
        if os.path.isfile(tsv):
            with open(tsv) as f:
                for line in f:
                    name, _, version = line.rstrip("\n").partition("\t")
                    if name == "julia":
                        jversion = version or jversion
                    elif name:
                        packages[name] = version
        bindir = os.path.join(stage, "bin")
        os.makedirs(bindir)
        with open(os.path.join(bindir, "julia"), "w") as f:
            f.write(WRAPPER % {"sysimage": "sysimage/" + sysimage_name()})
        os.chmod(os.path.join(bindir, "julia"), 0o755)
        os.makedirs(os.path.join(stage, "depot"), exist_ok=True)
        meta = {
            "kind": "julia", "created": pyenv._now(), "created_by": pyenv.created_by(),
            "command": list(command or sys.argv),
            "julia": {"version": jversion, "cpu_target": "generic", "executable": exe},
            "packages": packages, "stdlibs": mods["stdlibs"], "source": {"julia": source},
            "layout": {"sysimage": "sysimage/" + sysimage_name(), "depot": ["depot"], "project": "project",
                       "bin": "bin"},
        }
        return image.build(out, stage, meta, level=level)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        shutil.rmtree(build_depot, ignore_errors=True)
