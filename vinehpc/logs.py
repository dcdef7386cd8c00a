"""`vinehpc logs RUN_DIR --task ID | --worker ID`: a task's story and a worker's log, read from the
run directory alone (also after the run, from another machine).

A task's story comes from the journal (transactions.jsonl: its command at "submitted", each
attempt's worker, retries and requeues with their reasons, the end with the tail of its output),
then the log lines its workers wrote while it was there (the lines between its dispatch and its
end, `context` seconds either side, and any line naming it).  Worker logs are found where
launchers' workers copy them when they exit (RUN_DIR/workers/HOST-PID.log, a pilot's at the top
of its run directory), else at the path the worker gave when it joined (its node's work directory,
readable while it runs).  A pilot's run directory holds one journal per manager (manager-N/):
all are read.
"""
from __future__ import annotations

import calendar
import glob
import json
import os
import sys
import time


def journals(run_dir: str) -> list:
    """The transactions logs of a run directory (a pilot's: one per manager, in order)."""
    own = os.path.join(run_dir, "transactions.jsonl")
    if os.path.exists(own):
        return [own]
    found = glob.glob(os.path.join(run_dir, "manager-*", "transactions.jsonl"))
    return sorted(found, key=lambda p: int(p.split(os.sep)[-2].split("-")[-1]))


def _records(path: str, needles: tuple):
    """The records of `path` whose line contains one of `needles` (streamed: a journal of a million
    tasks is read line by line, and only matching lines are parsed)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if any(n in line for n in needles):
                try:
                    yield json.loads(line)
                except ValueError:       # a torn last line
                    pass


def _task_needles(tid: int) -> tuple:
    return ('"task":%d,' % tid, '"task":%d}' % tid, '"worker joined"', '"worker lost"')


def worker_records(run_dir: str) -> dict:
    """(journal, worker id) -> its "worker joined" record (with "lost": the loss record, if any)."""
    out = {}
    for j in journals(run_dir):
        for r in _records(j, ('"worker joined"', '"worker lost"')):
            key = (j, r.get("worker"))
            if r.get("event") == "worker joined":
                out[key] = dict(r)
            elif key in out:
                out[key]["lost"] = r
    return out


def log_path(run_dir: str, journal: str, joined: dict) -> str | None:
    """Where a worker's log is now: collected into a run directory's workers/, or on its node."""
    name = "%s-%s.log" % (joined.get("host"), joined.get("pid"))
    for d in (os.path.dirname(journal), run_dir):
        p = os.path.join(d, "workers", name)
        if os.path.exists(p):
            return p
    p = joined.get("log")
    return p if p and os.path.exists(p) else None


def _line_time(line: str) -> float | None:
    """The UTC time a worker log line starts with (vinehpc/worker/logfile.py), as a Unix time."""
    stamp = line[:23]
    try:
        t = time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")
        return calendar.timegm(t) + int(stamp[20:23]) / 1000.0
    except (ValueError, IndexError):
        return None


def log_lines(path: str, since: float | None = None, until: float | None = None, mention: str | None = None) -> list:
    """The lines of a worker log within [since, until] (a line without a time goes with the one
    before it) or containing `mention`."""
    out, keep = [], False
    with open(path, errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            t = _line_time(line)
            if t is not None:
                keep = (since is None or t >= since) and (until is None or t <= until)
            if keep or (mention and mention in line):
                out.append(line)
    return out


def _clock(t) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) + ".%03d" % int(t % 1 * 1000) if t else "?"


def task_story(run_dir: str, tid: int, context: float = 5.0) -> str:
    """A task's command, attempts, workers, result and output, and its workers' log lines."""
    lines, found, stays = [], False, []      # stays: (journal, worker, from, to)
    for j in journals(run_dir):
        joined, open_stay = {}, {}
        for r in _records(j, _task_needles(tid)):
            ev, t = r.get("event"), r.get("time")
            if ev == "worker joined":
                joined[r.get("worker")] = r
                continue
            if ev == "worker lost":
                if tid in (r.get("tasks") or ()):
                    lines.append("  %s  worker %s lost while it ran there: %s" % (_clock(t), r.get("worker"),
                                                                                   r.get("reason")))
                continue
            found = True
            w = r.get("worker")
            if ev == "submitted":
                lines.insert(0, "task %d: %s" % (tid, r.get("command") or "(command not recorded)"))
                lines.append("  %s  submitted (%s, category %s%s)" % (_clock(t), r.get("kind"), r.get("category"),
                                                                     ", tag %s" % r["tag"] if r.get("tag") else ""))
            elif ev == "dispatched":
                open_stay[w] = t
                lines.append("  %s  attempt %s sent to worker %s (%s)" % (_clock(t), r.get("attempt"), w,
                                                                        r.get("host")))
            elif ev in ("done", "failed"):
                lines.append("  %s  %s on worker %s: result %s, exit code %s, %s attempt(s), %s s%s"
                             % (_clock(t), ev, w, r.get("result"), r.get("exit_code"), r.get("attempts"),
                                r.get("wall"), "\n      reason: %s" % r["reason"] if r.get("reason") else ""))
                if r.get("output"):
                    lines.append("  output (its end, as the journal keeps it):")
                    lines.extend("    | " + x for x in r["output"].rstrip("\n").split("\n"))
            else:
                detail = ", ".join("%s %s" % (k, v) for k, v in r.items() if k not in ("event", "time", "task"))
                lines.append("  %s  %s: %s" % (_clock(t), ev, detail))
            if ev not in ("submitted", "dispatched") and w in open_stay:
                stays.append((j, w, open_stay.pop(w), t, joined.get(w)))
        for w, since in open_stay.items():        # still there when the journal ends
            stays.append((j, w, since, None, joined.get(w)))
    if not found:
        return "task %d: not in the journal of %s" % (tid, run_dir)
    spans = {}       # one excerpt per worker: from its first attempt's dispatch to its last one's end
    for j, w, since, until, rec in stays:
        if rec is not None:
            s0, u0, _ = spans.get((j, w), (since, until, rec))
            spans[(j, w)] = (min(s0, since), None if None in (u0, until) else max(u0, until), rec)
    for (j, w), (since, until, rec) in spans.items():
        path = log_path(run_dir, j, rec)
        head = "worker %s (%s, pid %s) log" % (w, rec.get("host"), rec.get("pid"))
        if path is None:
            lines.append("%s: not found (was %s)" % (head, rec.get("log")))
            continue
        got = log_lines(path, since - context, None if until is None else until + context,
                        mention="task %d:" % tid)
        lines.append("%s %s, %g s around the task:" % (head, path, context))
        lines.extend("    " + x for x in got or ["(no lines then)"])
    return "\n".join(lines)


def worker_log(run_dir: str, wid: int) -> str:
    """A worker's whole log (the last manager's worker `wid` in a pilot's run directory)."""
    recs = [(j, r) for (j, w), r in worker_records(run_dir).items() if w == wid]
    if not recs:
        return "worker %d: not in the journal of %s" % (wid, run_dir)
    j, rec = recs[-1]
    lost = rec.get("lost")
    head = "worker %d: %s, pid %s, joined %s%s" % (wid, rec.get("host"), rec.get("pid"), _clock(rec.get("time")),
                                                  ", lost %s: %s" % (_clock(lost.get("time")), lost.get("reason"))
                                                  if lost else "")
    path = log_path(run_dir, j, rec)
    if path is None:
        return "%s\nits log is not here: not collected into %s/workers and %s is gone" % (head, run_dir,
                                                                                           rec.get("log"))
    return "%s\nlog %s:\n%s" % (head, path, "\n".join(log_lines(path)))


def cli(run_dir: str, task: int | None = None, worker: int | None = None) -> int:
    if not journals(run_dir):
        print("vinehpc logs: no transactions.jsonl in %s (give a run directory: vine-run-info/...)" % run_dir,
              file=sys.stderr)
        return 2
    if task is not None:
        print(task_story(run_dir, task))
    if worker is not None:
        print(worker_log(run_dir, worker))
    if task is None and worker is None:
        for (j, w), r in worker_records(run_dir).items():
            lost = r.get("lost")
            print("worker %s: %s pid %s%s  log: %s" % (w, r.get("host"), r.get("pid"),
                                                       " (lost: %s)" % lost.get("reason") if lost else "",
                                                       log_path(run_dir, j, r) or "not found"))
    return 0
