"""`vinehpc sysimage ...`: argument parsing only; every subcommand calls a library function.

vinehpc/cli.py registers it with add_parser(subparsers) and dispatches to main(args).
`python -m sysimage_tools ...` runs the same subcommands without importing the engine.
"""
from __future__ import annotations

import argparse
import os
import sys


def add_parser(sub) -> argparse.ArgumentParser:
    """Add the `sysimage` subcommand (python, self, julia, run, info, verify) to `sub`."""
    s = sub.add_parser("sysimage", help="environment images: build, inspect, run from node-local disk",
                       description="Pack an environment into one compressed image (.vimg) that each node unpacks "
                                   "once onto local disk, so thousands of starts do not each walk a shared "
                                   "filesystem.")
    ss = s.add_subparsers(dest="sysimage_command", metavar="SUBCOMMAND")
    ss.required = True

    py = ss.add_parser("python", help="a Python environment image",
                       description="Build a relocatable Python environment image: the packages, byte-compiled "
                                   "with unchecked-hash pycs, plus a manifest (python ABI, files, packages), "
                                   "zstd-compressed. Built by, and for, this python's ABI.")
    src = py.add_mutually_exclusive_group(required=True)
    src.add_argument("-r", "--requirements", metavar="FILE", help="pip install -r FILE into the image")
    src.add_argument("--packages", nargs="+", metavar="PKG", help="pip install these (requirement specifiers)")
    src.add_argument("--venv", metavar="PATH", help="pack this virtual environment's site-packages")
    src.add_argument("--analyze", metavar="SCRIPT",
                     help="find what SCRIPT and its local modules import, write the spec (see --spec-out), build it")
    src.add_argument("--spec", metavar="FILE", help="build from a spec written by --analyze (edited or not)")
    py.add_argument("-o", "--output", required=True, metavar="OUT.vimg")
    py.add_argument("--spec-out", metavar="FILE", help="with --analyze: where the spec goes (default OUT.spec.json)")
    py.add_argument("--spec-only", action="store_true", help="with --analyze: write the spec, build nothing")
    py.add_argument("--level", type=_level, default=10, help="zstd level 1-19 (default 10)")

    me = ss.add_parser("self", help="vinehpc itself as one file: python3 vinehpc.pyz worker HOST:PORT",
                       description="Write vinehpc (+ cloudpickle, psutil, zstandard, orjson) as one zipapp that needs "
                                   "only a python3 of this ABI on the node; its compiled parts are unpacked "
                                   "node-local on first start.")
    me.add_argument("-o", "--output", required=True, metavar="vinehpc.pyz")
    me.add_argument("--include", action="append", default=[], metavar="DIST",
                    help="also pack this installed distribution (repeatable), e.g. mpi4py")

    jl = ss.add_parser("julia", help="a Julia sysimage image (PackageCompiler)",
                       description="Read the using/import lines of FILE.jl, build a PackageCompiler sysimage for "
                                   "cpu_target=generic with `julia`, and wrap it as an image.")
    jl.add_argument("source", metavar="FILE.jl")
    jl.add_argument("-o", "--output", metavar="OUT.vimg")
    jl.add_argument("--julia", metavar="PATH", help="the julia to build with (default: julia on PATH)")
    jl.add_argument("--project", metavar="DIR", help="start from this project's Project.toml/Manifest.toml")
    jl.add_argument("--precompile", action="append", default=[], metavar="FILE.jl",
                    help="a precompile_execution_file for PackageCompiler (repeatable)")
    jl.add_argument("--script-only", metavar="FILE", help="write the driver script to FILE, do not run julia")
    jl.add_argument("--level", type=_level, default=10)

    r = ss.add_parser("run", help="run a command inside an image (unpacked once per node)",
                      description="Unpack IMAGE once into the node-local cache ($VINEHPC_LOCAL_DIR, else $TMPDIR, "
                                  "else /tmp), then run CMD with the environment pointing only at that copy. "
                                  "On many nodes at once, use the cheap launcher instead (the same, with almost no "
                                  "shared-filesystem traffic of its own): python3 -S "
                                  "SITE-PACKAGES/sysimage_tools/launch.py IMAGE -- CMD")
    r.add_argument("image", metavar="IMAGE")
    r.add_argument("--local-dir", metavar="DIR", help="node-local directory (default $VINEHPC_LOCAL_DIR, $TMPDIR, /tmp)")
    r.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS]")

    i = ss.add_parser("info", help="show an image's manifest")
    i.add_argument("image", metavar="IMAGE")
    i.add_argument("--json", action="store_true", help="the whole manifest as JSON")

    v = ss.add_parser("verify", help="check every byte of an image")
    v.add_argument("image", metavar="IMAGE")
    return s


def _level(s):
    try:
        v = int(s)
    except ValueError:
        v = 0
    if not 1 <= v <= 19:
        raise argparse.ArgumentTypeError("expected a zstd level from 1 to 19, got %r" % s)
    return v


def _log(msg):
    print("vinehpc sysimage: %s" % msg, file=sys.stderr)


def main(args) -> int:
    """Run the parsed `vinehpc sysimage ...` command; returns the exit status."""
    from .image import ImageError
    cmd = args.sysimage_command
    try:
        if cmd == "run":
            from .run import run
            return run(args.image, args.cmd, local_dir=args.local_dir)
        if cmd == "python":
            from . import pyenv
            man = pyenv.build(args.output, requirements=args.requirements, packages=args.packages, venv=args.venv,
                              spec=args.spec, analyze=args.analyze, spec_out=args.spec_out,
                              spec_only=args.spec_only, level=args.level, command=_command(), log=_log)
            if man is not None:
                _done(man)
            return 0
        if cmd == "self":
            from . import selfpack
            man = selfpack.build(args.output, include=args.include, command=_command(), log=_log)
            _log("wrote %s (%.1f MB) for %s on %s: python3 %s worker HOST:PORT"
                 % (args.output, os.path.getsize(args.output) / 1e6, man["python"]["cache_tag"],
                    man["python"]["platform"], args.output))
            return 0
        if cmd == "julia":
            from . import julia
            if not args.output and not args.script_only:
                _log("give -o OUT.vimg (or --script-only FILE)")
                return 2
            man = julia.build(args.source, args.output, julia=args.julia, project=args.project,
                              precompile=args.precompile, script_only=args.script_only, level=args.level,
                              command=_command(), log=_log)
            if man is not None:
                _done(man)
            return 0
        if cmd == "info":
            from .image import read_manifest
            man = read_manifest(args.image)
            if args.json:
                import json
                print(json.dumps(dict(man.data, id=man.id), indent=2, sort_keys=True))
            else:
                print(man.summary())
            return 0
        if cmd == "verify":
            from .image import verify
            man = verify(args.image)
            print("%s: OK (%d entries, id %s)" % (args.image, len(man.files), man.id))
            return 0
    except ImageError as e:
        _log(str(e))
        return 2
    except (OSError, ValueError, SyntaxError) as e:
        _log(str(e))
        return 2
    except KeyboardInterrupt:
        return 130
    raise AssertionError(cmd)


def _command():
    return ["vinehpc"] + sys.argv[1:]


def _done(man):
    _log("wrote %s (%.1f MB, %d packages, id %s)" % (man.path, man.payload_size / 1e6,
                                                      len(man.data.get("packages") or {}), man.id[:16]))


def standalone(argv=None) -> int:
    """`python -m sysimage_tools SUBCOMMAND ...` (no engine import)."""
    p = argparse.ArgumentParser(prog="python -m sysimage_tools")
    sub = p.add_subparsers(dest="command")
    sub.required = True
    add_parser(sub)
    args = p.parse_args(["sysimage"] + list(sys.argv[1:] if argv is None else argv))
    return main(args)
