"""Stat storm: the same Python start from a venv on a shared filesystem vs from a node-local copy.

    python benchmarks/stat_storm.py                    # temporary dirs; the "shared" one is marked --shared
    python benchmarks/stat_storm.py --shared-dir /home/me/bench --local-dir /tmp/me/bench   # on a cluster
    python benchmarks/stat_storm.py --repeat 11 --ranks 1000 --json

The program: `import numpy` plus a dozen stdlib and package imports (in the spirit of the Julia
my_modules.jl example). Variants, each audited with `vinehpc audit --shared SHARED_DIR`:

  shared venv   SHARED_DIR/venv/bin/python -c PROGRAM: every import walks the shared tree.
  image         if `vinehpc sysimage` exists: an image of that venv (`vinehpc sysimage python --venv`),
                kept in SHARED_DIR (as it would be), unpacked node-local once (not measured), then
                `python -m vinehpc sysimage run SHARED_DIR/env.vimg -- python -c PROGRAM`
                (--runner sysimage_tools: `python -m sysimage_tools run ...`, without the engine).
  local copy    otherwise: the venv copied to LOCAL_DIR (what the image does, by hand) -- said so.

Printed for each: metadata ops, opens and all operations on the shared tree, total operations,
wall time under strace and without it (median of --repeat runs), and the ratios shared/other.
The venv is made without network: `python -m venv --without-pip`, then the packages are copied
from this interpreter's site-packages (numpy must be installed here).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

PY = sys.executable
# top-level names copied into the venv (with their *.dist-info): numpy plus a few small packages
PACKAGES = ("numpy", "numpy.libs", "yaml", "_yaml", "packaging", "idna", "certifi", "attr", "attrs",
            "dateutil", "six.py")
PROGRAM = ("import numpy, yaml, packaging.version, idna, certifi, attr, dateutil.parser; "
           "import json, decimal, fractions, csv, argparse, logging, pathlib, dataclasses, email.parser, "
           "urllib.parse, xml.etree.ElementTree, sqlite3, statistics, hashlib; "
           "assert numpy.arange(4).sum() == 6")


def log(msg):
    print("stat_storm: " + msg, file=sys.stderr, flush=True)


def sh(argv, **kw):
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def site_packages(prefix):
    return os.path.join(prefix, "lib", "python%d.%d" % sys.version_info[:2], "site-packages")


def make_venv(dest):
    r = sh([PY, "-m", "venv", "--without-pip", dest])
    if r.returncode:
        sys.exit("stat_storm: python -m venv failed: %s" % r.stderr)
    import numpy  # noqa: F401  - fail early and clearly
    src = os.path.dirname(os.path.dirname(numpy.__file__))
    dst = site_packages(dest)
    names = os.listdir(src)
    copied = []
    for top in PACKAGES:
        if top not in names:
            continue
        s = os.path.join(src, top)
        (shutil.copytree if os.path.isdir(s) else shutil.copy2)(s, os.path.join(dst, top))
        copied.append(top)
        base = top.split(".")[0].lstrip("_").lower()
        for n in names:
            if n.endswith(".dist-info") and n.lower().replace("_", "-").startswith(
                    {"yaml": "pyyaml", "attr": "attrs", "dateutil": "python-dateutil"}.get(base, base) + "-"):
                if not os.path.exists(os.path.join(dst, n)):
                    shutil.copytree(os.path.join(src, n), os.path.join(dst, n))
    return copied


def audit(tag, cmd, shared_dir, workdir, env=None, ranks=None):
    out = os.path.join(workdir, "%s.json" % tag)
    argv = [PY, "-m", "vinehpc", "audit", "--json", "-o", out, "--shared", shared_dir]
    if ranks:
        argv += ["--ranks", str(ranks)]
    r = sh(argv + ["--"] + cmd, env=env, cwd=workdir)
    if r.returncode:
        sys.exit("stat_storm: the audit of %s failed (exit %d):\n%s%s" % (tag, r.returncode, r.stdout, r.stderr))
    with open(out) as f:
        return json.load(f), out


def timed(variants, repeat, cwd=None):
    """Wall times of each (cmd, env), interleaved round by round so that a busy machine's noise hits
    both alike -> [(median, min)]."""
    times = [[] for _ in variants]
    for rnd in range(repeat + 1):                              # round 0 warms the page cache
        for i, (cmd, env) in enumerate(variants):
            t0 = time.perf_counter()
            r = sh(cmd, env=env, cwd=cwd)
            if r.returncode:
                sys.exit("stat_storm: %s failed: %s" % (" ".join(cmd), r.stderr))
            if rnd:
                times[i].append(time.perf_counter() - t0)
    return [(statistics.median(t), min(t)) for t in times]


def sysimage_available():
    return sh([PY, "-m", "vinehpc", "sysimage", "--help"]).returncode == 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared-dir", help="where the 'shared' venv goes (default: a temporary dir, marked --shared)")
    ap.add_argument("--local-dir", help="node-local directory (default: a temporary dir)")
    ap.add_argument("--repeat", type=int, default=11,
                    help="unaudited runs per variant for the wall time (interleaved; median and min)")
    ap.add_argument("--ranks", type=int, default=1000, help="projection in the audit reports")
    ap.add_argument("--no-image", action="store_true", help="compare with a plain node-local copy even if "
                                                            "vinehpc sysimage exists")
    ap.add_argument("--runner", choices=("worker", "vinehpc", "sysimage_tools"), default="worker",
                    help="how the image variant starts: as a vinehpc worker starts a task inside an image "
                         "(default: the program itself, with the image's environment), or through the "
                         "`python -m vinehpc sysimage run` / `python -m sysimage_tools run` wrapper")
    ap.add_argument("--keep", action="store_true", help="keep the directories and reports")
    ap.add_argument("--json", action="store_true", help="results as JSON on stdout")
    args = ap.parse_args(argv)

    tmp = tempfile.mkdtemp(prefix="stat-storm-")
    shared_dir = os.path.abspath(args.shared_dir or os.path.join(tmp, "shared"))
    local_dir = os.path.abspath(args.local_dir or os.path.join(tmp, "local"))
    work = os.path.join(tmp, "work")
    for d in (shared_dir, local_dir, work):
        os.makedirs(d, exist_ok=True)
    try:
        venv = os.path.join(shared_dir, "venv")
        if os.path.exists(venv):
            shutil.rmtree(venv)
        copied = make_venv(venv)
        log("venv under the shared dir: %s (%s)" % (venv, ", ".join(copied)))
        vpy = os.path.join(venv, "bin", "python")
        results = {}

        shared_cmd = [vpy, "-c", PROGRAM]
        rep, shared_json = audit("shared", shared_cmd, shared_dir, work, ranks=args.ranks)

        use_image = not args.no_image and sysimage_available()
        if use_image:
            image = os.path.join(shared_dir, "env.vimg")
            cache = os.path.join(local_dir, "cache")
            env = dict(os.environ, VINEHPC_LOCAL_DIR=cache)
            t0 = time.perf_counter()
            r = sh([PY, "-m", "vinehpc", "sysimage", "python", "--venv", venv, "-o", image], cwd=work)
            if r.returncode:
                sys.exit("stat_storm: building the image failed:\n%s%s" % (r.stdout, r.stderr))
            log("image %s built in %.1f s (%.1f MB)" % (image, time.perf_counter() - t0,
                                                        os.path.getsize(image) / 1e6))
            runner = ["vinehpc", "sysimage"] if args.runner != "sysimage_tools" else ["sysimage_tools"]
            cmd = [PY, "-m", *runner, "run", image, "--", PY, "-c", PROGRAM]
            t0 = time.perf_counter()
            r = sh(cmd, env=env, cwd=work)                     # the node's first start: unpacks (not measured)
            if r.returncode:
                sys.exit("stat_storm: vinehpc sysimage run failed:\n%s%s" % (r.stdout, r.stderr))
            log("first start (unpack into %s): %.2f s" % (cache, time.perf_counter() - t0))
            label = "image (node-local)"
            if args.runner == "worker":
                # what a worker does for a task inside an image: the program, in the image's environment
                from sysimage_tools.deploy import ensure_local
                env = ensure_local(image, local_dir=cache).env_for(env)
                cmd = [PY, "-c", PROGRAM]
        audit_cmd, audit_env = cmd, env
        if use_image and args.runner == "worker":
            # the audit tool itself runs outside the image; `env` puts the program inside it
            unset = [a for k in os.environ if k not in env for a in ("-u", k)]
            audit_cmd = ["env", *unset, *["%s=%s" % kv for kv in env.items() if os.environ.get(kv[0]) != kv[1]], *cmd]
            audit_env = None
        else:
            log("vinehpc sysimage is not available%s: comparing with a plain node-local copy of the venv"
                % (" (--no-image)" if args.no_image else ""))
            lvenv = os.path.join(local_dir, "venv")
            if os.path.exists(lvenv):
                shutil.rmtree(lvenv)
            shutil.copytree(venv, lvenv, symlinks=True)
            cmd, env = [os.path.join(lvenv, "bin", "python"), "-c", PROGRAM], None
            label = "local copy"
        rep2, other_json = audit("other", audit_cmd, shared_dir, work, env=audit_env, ranks=args.ranks)
        (m1, b1), (m2, b2) = timed([(shared_cmd, None), (cmd, env)], args.repeat, cwd=work)
        results["shared venv"] = row(rep, m1, b1)
        results[label] = row(rep2, m2, b2)

        cmp = sh([PY, "-m", "vinehpc", "audit", "--compare", shared_json, other_json, "--ranks", str(args.ranks)])
        a, b = results["shared venv"], results[label]
        ratios = {k: ratio(a[k], b[k]) for k in a}
        if args.json:
            print(json.dumps({"variants": results, "ratios_shared_over_other": ratios, "image": use_image,
                              "program": PROGRAM, "python": PY}, indent=2))
        else:
            print_table(results, label, ratios, args)
            print("\n" + cmp.stdout.rstrip())
            if args.keep:
                print("\nkept: %s (reports in %s)" % (tmp, work))
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
            if args.shared_dir:
                shutil.rmtree(os.path.join(shared_dir, "venv"), ignore_errors=True)
                for f in ("env.vimg", "env.vimg.spec.json"):
                    try:
                        os.unlink(os.path.join(shared_dir, f))
                    except OSError:
                        pass


def row(rep, med, best):
    sh_ = rep["shared"]
    return {"shared_metadata": sh_["metadata"], "shared_opens": sh_["opens"], "shared_ops": sh_["ops"],
            "total_ops": rep["totals"]["ops"], "wall_strace_s": rep["wall_seconds"],
            "wall_median_s": round(med, 4), "wall_min_s": round(best, 4)}


def ratio(a, b):
    if not b:
        return "inf" if a else None
    return round(a / b, 2)


def print_table(results, label, ratios, args):
    cols = [("shared_metadata", "shared metadata"), ("shared_opens", "shared opens"), ("shared_ops", "shared ops"),
            ("total_ops", "total ops"), ("wall_strace_s", "wall s (strace)"),
            ("wall_median_s", "wall s (median of %d)" % args.repeat), ("wall_min_s", "wall s (min)")]
    names = ["shared venv", label, "ratio shared/%s" % label.split(" ")[0]]
    w0 = max(len(n) for n in names)
    print("program: python -c %r" % PROGRAM)
    print(" " * w0 + "  " + "  ".join(h.rjust(max(len(h), 8)) for _, h in cols))
    for name in names[:2]:
        r = results[name]
        print(name.ljust(w0) + "  " + "  ".join(fmtv(r[k]).rjust(max(len(h), 8)) for k, h in cols))
    print(names[2].ljust(w0) + "  " + "  ".join(
        ("all gone" if ratios[k] == "inf" else "-" if ratios[k] is None else "%sx" % ratios[k]).rjust(max(len(h), 8))
        for k, h in cols))


def fmtv(v):
    return "%.3f" % v if isinstance(v, float) else "{:,}".format(v)


if __name__ == "__main__":
    sys.exit(main())
