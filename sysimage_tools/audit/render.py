"""Terminal tables for an audit report and for a comparison (numbers right-aligned, paths last)."""
from __future__ import annotations

import shlex

from .parser import KINDS
from .report import REMEDY, fmt

_R, _L = ">", "<"


def grid(header, rows, aligns, indent="  ") -> list:
    """Aligned columns, two spaces apart; the last column is not padded (long paths stay whole)."""
    cells = [list(header)] + [[c if isinstance(c, str) else fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    out = []
    for r in cells:
        parts = []
        for i, c in enumerate(r):
            last = i == len(r) - 1
            if last and aligns[i] == _L:
                parts.append(c)
            else:
                parts.append(c.rjust(widths[i]) if aligns[i] == _R else c.ljust(widths[i]))
        out.append((indent + "  ".join(parts)).rstrip())
    return out


def exit_text(ex) -> str:
    if not ex:
        return "exit status unknown"
    return ex.get("text") or "exited with %s" % ex.get("code")


def report_table(rep: dict) -> str:
    out = []
    cmd = rep.get("command")
    out.append("vinehpc audit: %s" % (" ".join(shlex.quote(c) for c in cmd) if cmd else "(trace file)"))
    bits = [exit_text(rep.get("exit"))] if rep.get("exit") else []
    if rep.get("wall_seconds") is not None:
        bits.append("%.2f s under strace" % rep["wall_seconds"])
    procs = rep["processes"]
    progs = ", ".join("%s x%d" % (p.rsplit("/", 1)[-1], n) for p, n in list(procs["programs"].items())[:6])
    bits.append("%d process%s%s" % (procs["count"], "" if procs["count"] == 1 else "es",
                                   " (%s)" % progs if progs else ""))
    out.append("  " + "; ".join(bits))
    if procs["failed"]:
        out.append("  failed processes: " + ", ".join("%s %s" % kv for kv in list(procs["failed"].items())[:8]))

    t = rep["totals"]
    kinds = {k: [0, 0, 0, 0, 0] for k in KINDS}
    for s in rep["syscalls"]:
        k = kinds[s["kind"]]
        for i, c in enumerate(("ops", "ok", "ENOENT", "errors", "unknown")):
            k[i] += s[c]
    out += ["", "Operations"]
    rows = [[k] + v for k, v in kinds.items() if v[0]]
    rows.append(["total", t["ops"], t["ok"], t["ENOENT"], t["errors"], t["unknown"]])
    if t["unknown"]:
        out += grid(["", "ops", "ok", "ENOENT", "other errors", "unfinished"], rows, [_L] + [_R] * 5)
    else:
        out += grid(["", "ops", "ok", "ENOENT", "other errors"], [r[:5] for r in rows], [_L] + [_R] * 4)
    out.append("  metadata ops %s, opens %s; %s distinct paths" % (fmt(t["metadata"]), fmt(t["opens"]),
                                                                  fmt(t["distinct_paths"])))
    if rep["errors"]:
        out.append("  errors: " + ", ".join("%s %s" % (e, fmt(n)) for e, n in rep["errors"].items()))

    out += ["", "By syscall"]
    out += grid(["syscall", "kind", "ops", "ok", "ENOENT", "other errors"],
                [[s["syscall"], s["kind"], s["ops"], s["ok"], s["ENOENT"], s["errors"]] for s in rep["syscalls"]],
                [_L, _L, _R, _R, _R, _R])

    out += ["", "By mount point (filesystem types from /proc/self/mountinfo; * = shared)"]
    out += grid(["ops", "metadata", "opens", "ENOENT", "paths", "fstype", "mount point"],
                [[m["ops"], m["metadata"], m["opens"], m["ENOENT"], "-" if m["distinct_paths"] is None
                  else m["distinct_paths"], m["fstype"] or "-",
                  ("* " if m["shared"] else "  ") + m["mountpoint"] + ("   [%s]" % m["why"] if m["shared"] else "")]
                 for m in rep["mounts"]],
                [_R, _R, _R, _R, _R, _L, _L])
    sh = rep["shared"]
    if sh["mounts"]:
        out.append("  shared filesystems: %s ops = %s metadata + %s opens (+ %s other), %s ENOENT, %s distinct paths"
                   % (fmt(sh["ops"]), fmt(sh["metadata"]), fmt(sh["opens"]),
                      fmt(sh["ops"] - sh["metadata"] - sh["opens"]), fmt(sh["ENOENT"]), fmt(sh["distinct_paths"])))
    else:
        out.append("  no shared filesystem was touched (mark shared trees with --shared PREFIX)")

    sections = [("top_paths", "path", "Top paths"), ("top_dirs", "dir", "Top directories")]
    if rep.get("top_shared_paths") and rep["top_shared_paths"] != rep["top_paths"][:len(rep["top_shared_paths"])]:
        sections.insert(1, ("top_shared_paths", "path", "Top paths on shared filesystems"))
    for key, label, title in sections:
        star = "" if key == "top_shared_paths" else " (* = on a shared filesystem)"
        out += ["", "%s by operations%s" % (title, star)]
        out += grid(["ops", "metadata", "opens", "ENOENT", label],
                    [[r["ops"], r["metadata"], r["opens"], r["ENOENT"], ("* " if r["shared"] else "  ") + r[label]]
                     for r in rep[key]], [_R, _R, _R, _R, _L])

    causes = rep["causes"]
    out += ["", "Likely causes (%s)" % causes["scope"]]
    if not causes["items"]:
        out.append("  nothing stands out")
    for c in causes["items"]:
        out.append("  - " + c["text"])
        for p in c.get("paths", ()):
            out.append("      %s x  %s  (%s)" % (fmt(p["metadata"]).rjust(7), p["path"],
                                                  ", ".join("%s %s" % kv for kv in p["syscalls"].items())))
        if c["kind"] == "search":
            for e in c["examples"][1:4]:
                out.append("      %s tried in %d directories (%s ENOENT), %s"
                           % (e["name"], e["directories"], fmt(e["enoent"]),
                              ("found in " + e["found_in"]) if e["found_in"] else "never found"))
    if causes["items"]:
        out.append("  remedy: " + REMEDY)

    proj = rep.get("projection")
    if proj:
        out += ["", "Projection: %s simultaneous starts" % fmt(proj["ranks"])]
        out += ["  " + ln for ln in proj["lines"]]
    elif sh["ops"]:
        out += ["", "(--ranks N projects the shared-filesystem load of N simultaneous starts)"]

    tr = rep["trace"]
    notes = []
    if tr["unparsed"]:
        notes.append("%d trace line(s) not understood, e.g. %r" % (tr["unparsed"], tr["unparsed_examples"][0]))
    if tr["died_in_call"]:
        notes.append("%d call(s) never returned (their process ended first): counted, result unknown"
                     % tr["died_in_call"])
    if tr["truncated"]:
        notes.append("%d path(s) were truncated by strace" % tr["truncated"])
    if notes:
        out += ["", "Notes"] + ["  " + n for n in notes]
    return "\n".join(out) + "\n"


def compare_table(cmp: dict) -> str:
    def cmd(side):
        c = cmp[side].get("command")
        return " ".join(shlex.quote(x) for x in c) if c else "(trace file)"
    out = ["vinehpc audit --compare", "  before: " + cmd("before"), "  after:  " + cmd("after"), ""]
    rows = []
    for r in cmp["rows"]:
        b, a = r["before"], r["after"]
        if b is None and a is None:
            continue
        rows.append([r["metric"], _num(b), _num(a), ratio_text(r["ratio"], b, a)])
    out += grid(["", "before", "after", "before/after"], rows, [_L, _R, _R, _R])
    return "\n".join(out) + "\n"


def _num(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "%.3f" % v if v < 10 else "%.1f" % v
    return fmt(v)


def ratio_text(r, before, after) -> str:
    """before/after as "52.8x" (so > 1 means fewer after); "all gone" when nothing is left."""
    if r == "inf":
        return "all gone"
    if r is None:
        return "-"
    if r >= 100:
        return fmt(round(r)) + "x"
    return ("%.1fx" if r >= 1 else "%.2fx") % r
