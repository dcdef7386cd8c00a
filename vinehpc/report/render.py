"""The report's words and numbers: the summary (for --json), the terminal text, the HTML page."""
from __future__ import annotations

import heapq
import html
import math
import os
import time


SLOW_LISTED = 20
ROWS_MAX = 50          # rows of a table in the page (the JSON has what the aggregates keep)

# (id, title, what it shows): the page's sections, in order
SECTIONS = (
    ("summary", "Summary", "makespan, core-hours used against allocated, the slowest 1 % of tasks"),
    ("over-time", "Tasks over time", "waiting, running and done; cores in use against cores connected"),
    ("timeline", "Workers' timeline", "each worker's tasks, colored by category; failures and retries in red"),
    ("histograms", "Durations and memory", "per category"),
    ("resources", "Allocated against measured", "per category: what tasks were given, what they used"),
    ("transfers", "Transfers and cache", "bytes sent to workers, cache hits"),
    ("workers", "Workers joined and lost", ""),
    ("failures", "Failures and retries", "grouped by reason (numbers in a reason are shown as N)"),
)


def summary(agg) -> dict:
    """Everything the report says, as plain data (--json)."""
    n = agg.n
    cats = [c.summary() for c in agg.categories.values()]
    used = sum(c.core_s_used for c in agg.categories.values()) / 3600
    provisioned = sum(agg.capacity) / 3600
    allocated = sum(agg.busy_cores) / 3600
    finals = sum(sum(c.wall_hist) for c in agg.categories.values())
    k = min(math.ceil(finals / 100), len(agg.slow)) if finals else 0
    slow = heapq.nlargest(k, agg.slow)
    makespan = (agg.last_final - agg.first_submit) if agg.last_final is not None and agg.first_submit else None
    lost = [w for w in agg.workers.values() if w.reason is not None]
    return {
        "journal": agg.path, "records": n["records"], "runs": n["sessions"],
        "unreadable_lines": n["unreadable"], "truncated_last_line": agg.torn_last,
        "started": agg.start, "stopped": agg.stop, "stop_reason": agg.stop_reason,
        "makespan": makespan,
        "tasks": {"submitted": n["submitted"] + n["resumed"], "done": n["done"], "failed": n["failed"],
                  "resumed": n["resumed"],
                  "unfinished": n["submitted"] - n["done"] - n["failed"],
                  "attempts": n["attempts"], "retries": n["retries"], "requeued": n["requeued"],
                  "fast_aborts": n["fast aborts"], "not_run": n["not run"],
                  "tasks_with_more_than_one_attempt": n["multi-attempt"]},
        "workers": {"joined": agg.workers_seen, "lost": n["workers lost"], "peak_connected": agg.connected_peak},
        "core_hours": {"workers": provisioned, "allocated_to_tasks": allocated, "used": used,
                       "efficiency": used / provisioned if provisioned else None,
                       "utilization": allocated / provisioned if provisioned else None},
        "slowest_1pct": {"count": k, "threshold": slow[-1][0] if slow else None,
                         "share_of_task_time": sum(s[0] for s in slow) / agg.wall_total if agg.wall_total else None,
                         "tasks": [{"task": t, "wall": w, "category": c, "worker": wk}
                                   for w, t, c, wk in slow[:SLOW_LISTED]]},
        "transfers": {"inputs_sent": n["puts"], "bytes_sent": n["bytes put"], "cache_hits": n["cache hits"],
                      "temp_fetches": n["temp fetches"], "url_fetches": n["url fetches"]},
        "categories": cats,
        "failure_reasons": [{"kind": k_[0], "result": k_[1], "reason": g[1], "count": g[0], "tasks": g[2],
                             "categories": sorted(g[3])}
                            for k_, g in sorted(agg.groups.items(), key=lambda kv: -kv[1][0])],
        "failed_tasks": agg.failures,
        "workers_lost": [{"run": w.key[0], "worker": w.key[1], "host": w.host, "joined": w.joined,
                          "lost": w.lost, "reason": w.reason} for w in lost],
    }


# ------------------------------------------------------------------ formatting
def _s(x) -> str:
    """Seconds, readable."""
    if x is None:
        return "-"
    if x >= 7200:
        return "%.2f h" % (x / 3600)
    if x >= 120:
        return "%.1f min" % (x / 60)
    return "%.3g s" % x


def _b(x) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if x < 1000 or unit == "TB":
            return ("%d %s" if unit == "B" else "%.1f %s") % (x, unit)
        x /= 1000.0


def _pct(x) -> str:
    return "-" if x is None else "%.0f%%" % (100 * x)


def _g(x) -> str:
    return "-" if x is None else "%.3g" % x


def _lines(s) -> list:
    """The summary as (label, text) lines: the terminal and the page's summary table say the same."""
    t, w, ch, sl, tr = s["tasks"], s["workers"], s["core_hours"], s["slowest_1pct"], s["transfers"]
    out = [
        ("tasks", "%d submitted: %d done, %d failed, %d resumed, %d not finished" % (
            t["submitted"], t["done"], t["failed"], t["resumed"], t["unfinished"])),
        ("attempts", "%d (%d retries, %d requeued, %d fast aborts, %d not run; %d tasks took more than one)" % (
            t["attempts"], t["retries"], t["requeued"], t["fast_aborts"], t["not_run"],
            t["tasks_with_more_than_one_attempt"])),
        ("makespan", "%s (first submission to last result)" % _s(s["makespan"])),
        ("workers", "%d joined, %d lost, at most %d connected at once" % (w["joined"], w["lost"], w["peak_connected"])),
        ("core-hours", "workers %.4g, allocated to tasks %.4g (utilization %s), used by tasks (measured CPU) %.4g "
                       "(efficiency %s)" % (ch["workers"], ch["allocated_to_tasks"], _pct(ch["utilization"]),
                                            ch["used"], _pct(ch["efficiency"]))),
        ("slowest 1%", "%d task%s of at least %s, %s of all task time" % (
            sl["count"], "" if sl["count"] == 1 else "s", _s(sl["threshold"]), _pct(sl["share_of_task_time"]))),
        ("transfers", "%d inputs sent (%s), %d cache hits, %d temp fetches, %d URL fetches" % (
            tr["inputs_sent"], _b(tr["bytes_sent"]), tr["cache_hits"], tr["temp_fetches"], tr["url_fetches"])),
    ]
    if s["unreadable_lines"]:
        out.append(("warning", "%d unreadable line(s) skipped%s" % (
            s["unreadable_lines"], " (the last one is torn: the run was killed?)" if s["truncated_last_line"] else "")))
    return out


def _cat_rows(s) -> list:
    return [(c["name"], c["done"], c["failed"], c["attempts"], _s(c["wall_mean"]), _s(c["wall_p99"]),
             "%.3g / %.3g" % (c["core_hours_allocated"], c["core_hours_used"]),
             "%s / %s / %s" % (_g(c["memory_allocated_mean"]), _g(c["memory_used_mean"]), _g(c["memory_used_max"])))
            for c in s["categories"]]


CAT_HEAD = ("category", "done", "failed", "attempts", "mean", "p99", "core-h alloc / used",
            "memory MB alloc / used / max")


def text(s) -> str:
    out = ["vinehpc report: %s (%d records, %d run%s)" % (s["journal"], s["records"], s["runs"],
                                                          "" if s["runs"] == 1 else "s")]
    out += ["  %-11s %s" % kv for kv in _lines(s)]
    rows = [CAT_HEAD] + [tuple(str(x) for x in r) for r in _cat_rows(s)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(CAT_HEAD))]
    out.append("")
    out += ["  " + "  ".join(v.ljust(widths[i]) for i, v in enumerate(r)) for r in rows]
    if s["slowest_1pct"]["tasks"]:
        out += ["", "  slowest tasks:"]
        out += ["    task %s  %s  %s  worker %s" % (x["task"], _s(x["wall"]), x["category"], x["worker"])
                for x in s["slowest_1pct"]["tasks"][:5]]
    if s["failure_reasons"]:
        out += ["", "  failures, retries and losses by reason:"]
        out += ["    %5d  %-12s %-10s %s" % (g["count"], g["kind"], g["result"], g["reason"][:100])
                for g in s["failure_reasons"][:10]]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------ HTML
_CSS = """
body{font-family:system-ui,sans-serif;margin:0 auto;max-width:1100px;padding:1em 2em;color:#222}
h1{font-size:1.4em} h2{font-size:1.15em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
nav a{margin-right:1em} .what{color:#666;margin-top:-.6em}
table{border-collapse:collapse;margin:.5em 0;font-size:.85em} td,th{border:1px solid #ddd;padding:.2em .5em;
text-align:left;vertical-align:top} th{background:#f4f4f4} td.num{text-align:right}
svg{max-width:100%;height:auto} .note{color:#666;font-size:.85em}
"""

# Set before anything else: a script error anywhere marks the page (tests read it with --dump-dom).
_ONERROR = ("<script>window.onerror=function(m){document.documentElement.setAttribute('data-error',String(m));};"
            "</script>")


def _table(head, rows, more=0) -> str:
    e = html.escape
    cells = lambda r, tag: "".join("<%s%s>%s</%s>" % (tag, ' class="num"' if isinstance(v, (int, float)) else "",
                                                       e(str(v)), tag) for v in r)
    if not rows:
        return '<p class="note">none</p>'
    out = "<table>%s%s</table>" % ("<tr>%s</tr>" % cells(head, "th") if head else "",
                                   "".join("<tr>%s</tr>" % cells(r, "td") for r in rows[:ROWS_MAX]))
    hidden = len(rows) - ROWS_MAX + more
    if hidden > 0:
        out += '<p class="note">%d more not shown (see --json)</p>' % hidden
    return out


def page(s, figures, title) -> str:
    e = html.escape
    body = {
        "summary": _table(None, _lines(s)) + _table(CAT_HEAD, _cat_rows(s)) + "<h3>Slowest tasks</h3>" + _table(
            ("task", "duration", "category", "worker"),
            [(x["task"], _s(x["wall"]), x["category"], x["worker"]) for x in s["slowest_1pct"]["tasks"]]),
        "workers": "<h3>Workers lost</h3>" + _table(
            ("worker", "host", "joined (s)", "lost (s)", "reason"),
            [(("%d:" % w["run"] if s["runs"] > 1 else "") + str(w["worker"]), w["host"],
              round(w["joined"] - (s["started"] or 0), 2), round(w["lost"] - (s["started"] or 0), 2), w["reason"])
             for w in s["workers_lost"]]),
        "failures": _table(("count", "kind", "result", "reason (an example)", "tasks (first)", "categories"),
                           [(g["count"], g["kind"], g["result"], g["reason"], ", ".join(map(str, g["tasks"])),
                             ", ".join(g["categories"])) for g in s["failure_reasons"]])
        + "<h3>Tasks that failed</h3>" + _table(
            ("task", "category", "result", "reason", "attempts", "worker", "exit code"),
            [tuple("" if v is None else v for v in f.values()) for f in s["failed_tasks"]],
            more=s["tasks"]["failed"] - len(s["failed_tasks"])),
    }
    parts = ["<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>%s</title>" % e(title), _ONERROR,
             "<style>%s</style></head><body><h1>%s</h1>" % (_CSS, e(title)),
             '<p class="note">from %s, made %s</p>' % (e(s["journal"] or ""), time.strftime("%Y-%m-%d %H:%M")),
             "<nav>%s</nav>" % "".join('<a href="#%s">%s</a>' % (i, e(t)) for i, t, _ in SECTIONS)]
    for sid, t, what in SECTIONS:
        parts.append('<section id="%s"><h2>%s</h2>%s%s%s</section>' % (
            sid, e(t), '<p class="what">%s</p>' % e(what) if what else "", figures.get(sid, ""), body.get(sid, "")))
    parts.append("<script>document.documentElement.setAttribute('data-ready','1');</script></body></html>")
    return "\n".join(parts)


def default_title(path) -> str:
    run_dir = os.path.dirname(os.path.abspath(path))
    return "vinehpc run %s" % os.path.basename(run_dir)
