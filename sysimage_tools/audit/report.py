"""Aggregate a parsed trace into the audit report (a JSON-able dict), find the likely causes of a
shared-filesystem storm, project it to N ranks, and compare two reports.

The report is the machine format (`vinehpc audit --json`); render.py draws the tables from it, and
`--compare` reads two of them back, so every number the tables show is in the JSON.
"""
from __future__ import annotations

import posixpath
import re
from collections import Counter, defaultdict

from .parser import EXEC, KINDS, METADATA, MODIFY, OK, OPEN, UNKNOWN

FORMAT = 1                               # "vinehpc_audit" key: the JSON format's version
REPEAT_MIN = 10                          # metadata calls on one path from which it is "repeated"
SEARCH_MIN_DIRS = 3                      # a name missed (ENOENT) in this many directories is a search
UNRESOLVED = "(unresolved)"              # relative path with unknown cwd, or an fd with unknown path

# per-path counters (and per mount, per directory)
_COLS = ("ops", METADATA, OPEN, EXEC, MODIFY, "ok", "ENOENT", "errors", "unknown")
_I = {c: i for i, c in enumerate(_COLS)}
_KIND_I = {k: _I[k] for k in KINDS}


def _row() -> list:
    return [0] * len(_COLS)


def _row_json(row, **extra) -> dict:
    d = dict(extra)
    d.update({c: row[i] for i, c in enumerate(_COLS)})
    d["opens"] = d.pop(OPEN)
    return d


def build(trace, table, *, top: int = 15, ranks: int = None, command=None, cwd=None, exit=None,
          wall_seconds=None, strace=None) -> dict:
    """The report of `trace` (parser.Trace) with paths placed by `table` (mounts.MountTable)."""
    by_path = defaultdict(_row)
    syscalls: dict = {}
    errors = Counter()
    for op in trace.ops:
        row = by_path[op.path if op.path is not None and op.path.startswith("/") else UNRESOLVED]
        sc = syscalls.get(op.syscall)
        if sc is None:
            sc = syscalls[op.syscall] = [op.kind, 0, 0, 0, 0, 0]    # kind, ops, ok, ENOENT, other errors, unknown
        sc[1] += 1
        row[0] += 1
        row[_KIND_I[op.kind]] += 1
        r = op.result
        if r == OK:
            row[5] += 1
            sc[2] += 1
        elif r == "ENOENT":
            row[6] += 1
            sc[3] += 1
            errors[r] += 1
        elif r == UNKNOWN:
            row[8] += 1
            sc[5] += 1
        else:
            row[7] += 1
            sc[4] += 1
            errors[r] += 1

    total, by_mount, by_dir, mount_paths = _row(), {}, defaultdict(_row), Counter()
    shared_paths = set()
    for path, row in by_path.items():
        _add(total, row)
        if path == UNRESOLVED:
            key = None
        else:
            m = table.lookup(path)
            key = m.mountpoint
            mount_paths[key] += 1
            if m.shared:
                shared_paths.add(path)
            _add(by_dir[posixpath.dirname(path) or "/"], row)
        if key not in by_mount:
            by_mount[key] = _row()
        _add(by_mount[key], row)

    mounts = []
    shared = _row()
    for key, row in sorted(by_mount.items(), key=lambda kv: (-kv[1][0], kv[0] or "")):
        if key is None:
            mounts.append(_row_json(row, mountpoint=UNRESOLVED, fstype="", source="", shared=False,
                                    why="relative path with unknown cwd, or fd with unknown path",
                                    distinct_paths=None))
            continue
        m = table.by_point[key]
        if m.shared:
            _add(shared, row)
        mounts.append(_row_json(row, distinct_paths=mount_paths[key], **m.to_json()))

    def top_rows(rows, label):
        best = sorted(rows.items(), key=lambda kv: (-kv[1][0], kv[0]))[:top]
        return [_row_json(r, **{label: p, "shared": p != UNRESOLVED and table.lookup(p).shared}) for p, r in best]

    report = {
        "vinehpc_audit": FORMAT,
        "command": list(command) if command else None,
        "cwd": cwd,
        "exit": exit,
        "wall_seconds": wall_seconds,
        "strace": strace,
        "trace": {"lines": trace.lines, "unparsed": trace.unparsed, "unparsed_examples": trace.unparsed_examples,
                  "restarted": trace.restarted, "died_in_call": trace.died_in_call, "truncated": trace.truncated,
                  "ignored_syscalls": sum(trace.ignored.values()), "signals": dict(trace.signals)},
        "processes": _processes(trace),
        "totals": dict(_row_json(total), distinct_paths=len(by_path) - (UNRESOLVED in by_path)),
        "errors": dict(errors.most_common()),
        "syscalls": [{"syscall": n, "kind": v[0], "ops": v[1], "ok": v[2], "ENOENT": v[3], "errors": v[4],
                      "unknown": v[5]} for n, v in sorted(syscalls.items(), key=lambda kv: (-kv[1][1], kv[0]))],
        "mounts": mounts,
        "shared": dict(_row_json(shared), distinct_paths=len(shared_paths),
                       mounts=[m["mountpoint"] for m in mounts if m["shared"]]),
        "top_paths": top_rows(by_path, "path"),
        "top_shared_paths": top_rows({p: by_path[p] for p in shared_paths}, "path"),
        "top_dirs": top_rows(by_dir, "dir"),
    }
    focus_shared = shared[0] > 0
    focus = {p: r for p, r in by_path.items() if p in shared_paths} if focus_shared else \
        {p: r for p, r in by_path.items() if p != UNRESOLVED}
    report["causes"] = {"scope": "on shared filesystems" if focus_shared else
                        "on all filesystems: nothing shared was touched",
                        "items": causes(trace, focus, by_path)}
    report["projection"] = project(report, ranks) if ranks else None
    return report


def _add(acc, row):
    for i, v in enumerate(row):
        acc[i] += v


def _processes(trace) -> dict:
    procs = trace.processes
    execs = Counter(op.path for op in trace.ops if op.kind == EXEC and op.result == OK and op.path)
    failed = {str(pid): ("killed by " + p["signal"]) if p["signal"] else "exited with %d" % p["exit_code"]
              for pid, p in procs.items() if p["signal"] or p["exit_code"]}
    return {"count": len(procs), "programs": dict(execs.most_common(15)), "failed": failed}


# ------------------------------------------------------------------ causes
_PY_INIT = re.compile(r"^__init__\.")
_PY_NAME = re.compile(r"(\.py[cwi]?|\.pth|\.cpython-[^/]*\.so|\.abi3\.so|\.egg-link|^pyvenv\.cfg|^python\d+\.zip|"
                      r"^pybuilddir\.txt)$")
# the subdirectories ld.so tries in every library directory
_HWCAP_DIR = re.compile(r"^(glibc-hwcaps|tls|haswell|avx512_1|x86_64|x86-64-v[234]|i686|sse2|power\d+|"
                        r"aarch64|atomics|asimd)$")
_LIB_NAME = re.compile(r"\.so(\.[0-9]+)*$")
_JULIA_NAME = re.compile(r"^(Julia)?(Project|Manifest)\.toml$|\.jl$|\.ji$|\.pkgimage")
SEARCH_KINDS = {
    "python": "Python import search over sys.path (PYTHONPATH, site-packages, .pth files)",
    "python_init": "Python package imports: every package directory is probed for __init__ with each "
                   "extension-module suffix before __init__.py",
    "library": "shared-library search (LD_LIBRARY_PATH, RUNPATH/RPATH, glibc-hwcaps subdirectories)",
    "julia": "Julia load-path / depot walk (JULIA_LOAD_PATH, JULIA_DEPOT_PATH, environment stack)",
    "exec": "executable search over PATH",
    "other": "search over a list of directories",
}


def _search_kind(name: str, syscalls: set, dirs) -> str:
    if _JULIA_NAME.search(name) or any("/.julia/" in d or "/share/julia" in d or "/compiled/v" in d for d in dirs):
        return "julia"
    if _PY_INIT.search(name):
        return "python_init"
    if _PY_NAME.search(name) or any("-packages" in d or "/lib/python" in d for d in dirs):
        return "python"
    if _LIB_NAME.search(name) or _HWCAP_DIR.search(name):
        return "library"
    if syscalls & {"execve", "execveat"}:
        return "exec"
    return "other"


def causes(trace, focus: dict, everything: dict = None) -> list:
    """The likely causes of the load on the paths in `focus` ({path: row}), biggest first.

    Search paths are found over `everything` (a search walks local and shared directories
    alike) and reported when they cost `focus` something."""
    items = []
    ops = sum(r[0] for r in focus.values())
    if not ops:
        return items
    everything = focus if everything is None else everything
    meta = sum(r[1] for r in focus.values())
    enoent = sum(r[6] for r in focus.values())

    # 1. the same path, again and again
    repeated = sorted(((r[1], p) for p, r in focus.items() if r[1] >= REPEAT_MIN), reverse=True)
    if repeated:
        top5 = repeated[:5]
        calls = defaultdict(Counter)
        wanted = {p for _, p in top5}
        for op in trace.ops:
            if op.kind == METADATA and op.path in wanted:
                calls[op.path][op.syscall] += 1
        share = sum(n for n, _ in repeated)
        items.append({
            "kind": "repeated", "weight": share,
            "text": "repeated metadata calls on the same paths: %d path(s) got >= %d each, %s of %s metadata ops"
                    % (len(repeated), REPEAT_MIN, fmt(share), fmt(meta)),
            "paths": [{"path": p, "metadata": n, "syscalls": dict(calls[p].most_common())} for n, p in top5]})

    # 2. a name looked up (and missed) in many directories: a search path
    missed, found, how = defaultdict(set), defaultdict(list), defaultdict(set)
    for p, r in everything.items():
        if not p.startswith("/"):
            continue
        d, name = posixpath.split(p)
        if r[6]:
            missed[name].add(d)
        if r[5]:
            found[name].append(d)
    for op in trace.ops:
        if op.result == "ENOENT" and op.path is not None and op.path.startswith("/"):
            how[posixpath.basename(op.path)].add(op.syscall)
    groups = defaultdict(list)
    for name, dirs in missed.items():
        if len(dirs) < SEARCH_MIN_DIRS:
            continue
        here = sum(focus[q][6] for q in (posixpath.join(d, name) for d in dirs) if q in focus)
        if here:
            groups[_search_kind(name, how[name], dirs)].append((len(dirs), here, name))
    for kind, names in groups.items():
        names.sort(key=lambda x: (-x[0], -x[1], x[2]))
        ndirs, _, example = names[0]
        fails = sum(n for _, n, _ in names)
        dirs = set().union(*(missed[nm] for _, _, nm in names))
        where = found.get(example)
        items.append({
            "kind": "search", "search": kind, "weight": fails, "names": len(names), "directories": len(dirs),
            "enoent": fails,
            "text": "%s: %s failed lookups (ENOENT) here, of %d name(s) searched across %d directories; e.g. %s "
                    "tried in %d directories, %s" % (SEARCH_KINDS[kind], fmt(fails), len(names), len(dirs), example,
                                                     ndirs, ("found in " + where[0]) if where else "never found"),
            "examples": [{"name": nm, "directories": nd, "enoent": nf, "found_in": (found.get(nm) or [None])[0]}
                         for nd, nf, nm in names[:5]]})

    # 3. ENOENT-heavy in general
    if enoent >= 50 and enoent >= 0.25 * ops:
        items.append({"kind": "enoent", "weight": enoent,
                      "text": "%d%% of the operations (%s of %s) look for files that do not exist (ENOENT)"
                              % (round(100.0 * enoent / ops), fmt(enoent), fmt(ops))})

    # 4. many distinct files opened, directories listed
    opened = [p for p, r in focus.items() if r[2]]
    if len(opened) >= 100:
        items.append({"kind": "many_files", "weight": sum(focus[p][2] for p in opened),
                      "text": "%s distinct files opened (%s opens): many small files, each a lookup and an open "
                              "on every rank" % (fmt(len(opened)), fmt(sum(focus[p][2] for p in opened)))})
    listed = Counter(op.path for op in trace.ops if op.syscall in ("getdents64", "getdents") and op.path in focus)
    if sum(listed.values()) >= 50:
        items.append({"kind": "listings", "weight": sum(listed.values()),
                      "text": "%s directory listings (getdents) of %d directories" % (fmt(sum(listed.values())),
                                                                                    len(listed))})
    items.sort(key=lambda c: -c["weight"])
    return items


# the cheap image launcher (sysimage_tools/launch.py): where it is in this installation
LAUNCHER = posixpath.join(posixpath.dirname(posixpath.dirname(posixpath.abspath(__file__))), "launch.py")
REMEDY = ("ship the environment as one image unpacked on node-local disk (vinehpc sysimage), and start commands "
          "from it with the cheap launcher, `python3 -S %s IMAGE -- CMD` (stdlib only, no site-packages: "
          "`vinehpc sysimage run` itself costs several times more); or shorten the "
          "search paths (sys.path/PYTHONPATH, LD_LIBRARY_PATH, JULIA_LOAD_PATH/JULIA_DEPOT_PATH); for Julia, "
          "a sysimage (PackageCompiler) removes most of the package loading" % LAUNCHER)


# ------------------------------------------------------------------ projection
def project(report: dict, ranks: int) -> dict:
    """What `ranks` simultaneous starts of the audited command do to each shared mount."""
    per_mount = []
    lines = []
    for m in report["mounts"]:
        if not m["shared"] or not m["ops"]:
            continue
        row = {"mountpoint": m["mountpoint"], "fstype": m["fstype"]}
        for c in ("ops", METADATA, "opens", "ENOENT"):
            row[c] = m[c]
            row[c + "_total"] = m[c] * ranks
        per_mount.append(row)
        lines.append("%s metadata ops x %s ranks = %s metadata ops on %s (%s)"
                     % (fmt(m[METADATA]), fmt(ranks), fmt(m[METADATA] * ranks), m["mountpoint"], m["fstype"]))
        lines.append("    + %s opens x %s = %s opens (of all %s operations there, %s fail with ENOENT)"
                     % (fmt(m["opens"]), fmt(ranks), fmt(m["opens"] * ranks), fmt(m["ops"] * ranks),
                        fmt(m["ENOENT"] * ranks)))
    sh = report["shared"]
    total = {c + "_total": sh[c] * ranks for c in ("ops", METADATA, "opens", "ENOENT")}
    if per_mount:
        if len(per_mount) > 1:
            lines.append("all shared filesystems: %s ops x %s ranks = %s operations for one simultaneous start"
                         % (fmt(sh["ops"]), fmt(ranks), fmt(sh["ops"] * ranks)))
    else:
        lines.append("no operation reached a shared filesystem: %s ranks add no shared-filesystem load "
                     "(mount types from /proc/self/mountinfo; add --shared PREFIX for trees your site shares)"
                     % fmt(ranks))
    return {"ranks": ranks, "mounts": per_mount, "total": total, "lines": lines}


# ------------------------------------------------------------------ compare
_METRICS = (
    ("shared-FS operations", ("shared", "ops")),
    ("shared-FS metadata ops", ("shared", METADATA)),
    ("shared-FS opens", ("shared", "opens")),
    ("shared-FS ENOENT", ("shared", "ENOENT")),
    ("shared-FS distinct paths", ("shared", "distinct_paths")),
    ("total operations", ("totals", "ops")),
    ("metadata ops", ("totals", METADATA)),
    ("opens", ("totals", "opens")),
    ("exec", ("totals", EXEC)),
    ("ENOENT", ("totals", "ENOENT")),
    ("distinct paths", ("totals", "distinct_paths")),
    ("processes", ("processes", "count")),
    ("wall seconds (under strace)", ("wall_seconds",)),
)


def check_report(d, what: str) -> dict:
    if not isinstance(d, dict) or "vinehpc_audit" not in d:
        raise ValueError("%s is not a vinehpc audit report (write one with: vinehpc audit --json -o FILE -- CMD)"
                         % what)
    if d["vinehpc_audit"] > FORMAT:
        raise ValueError("%s was written by a newer vinehpc (report format %s, this one reads %d)"
                         % (what, d["vinehpc_audit"], FORMAT))
    return d


def compare(before: dict, after: dict, ranks: int = None) -> dict:
    """Side by side: each metric before, after and the reduction (before / after)."""
    rows = []
    for label, keys in _METRICS:
        rows.append(_cmp_row(label, _get(before, keys), _get(after, keys)))
    mb = {m["mountpoint"]: m for m in before["mounts"] if m["shared"]}
    ma = {m["mountpoint"]: m for m in after["mounts"] if m["shared"]}
    for point in sorted(set(mb) | set(ma)):
        b, a = mb.get(point), ma.get(point)
        fstype = (b or a)["fstype"]
        for c in (METADATA, "opens"):
            rows.append(_cmp_row("%s (%s): %s" % (point, fstype, "metadata ops" if c == METADATA else c),
                                 b[c] if b else 0, a[c] if a else 0))
    if ranks:
        for c, label in ((METADATA, "metadata ops"), ("opens", "opens")):
            rows.append(_cmp_row("at %s ranks: shared-FS %s" % (fmt(ranks), label),
                                 before["shared"][c] * ranks, after["shared"][c] * ranks))
    return {"vinehpc_audit_compare": FORMAT, "before": {"command": before.get("command")},
            "after": {"command": after.get("command")}, "ranks": ranks, "rows": rows}


def _get(d, keys):
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _cmp_row(label, b, a) -> dict:
    r = ratio(b, a)
    return {"metric": label, "before": b, "after": a, "ratio": "inf" if r == float("inf") else r}


def ratio(before, after):
    """before / after; None when undefined. float('inf') when everything went away."""
    if before is None or after is None:
        return None
    if after == 0:
        return float("inf") if before else None
    return before / after


# ------------------------------------------------------------------ numbers
def fmt(n) -> str:
    """12345 -> '12,345'; 12_000_000 -> '12 M'; 3.4e9 -> '3.4 G'."""
    if n is None:
        return "-"
    if isinstance(n, float) and not n.is_integer():
        return "%.3g" % n
    n = int(n)
    if abs(n) < 1_000_000:
        return "{:,}".format(n)
    if abs(n) < 1_000_000_000:
        return "%s M" % ("%.3g" % (n / 1e6))
    return "%s G" % ("%.3g" % (n / 1e9))
