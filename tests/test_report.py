"""`vinehpc report`: a real run with a failure, a retry and a lost worker, reported as a person would
read it: the numbers against the journal, the terminal text, the JSON, the HTML opened in headless
Chromium (a screenshot that is not blank, no script error), a killed run's torn log, a run directory
that is missing, empty or garbage, and a 10,000-task synthetic log (benchmarks/report.py)."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

import vinehpc
from conftest import poll, read_journal, wait_all, worker_cmd
from slurm_fixture import require

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("summary", "over-time", "timeline", "histograms", "resources", "transfers", "workers", "failures")
N_SHORT, N_LONG = 240, 12      # a few hundred tasks, as the issue asks of each command's real run


def vinehpc_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "vinehpc", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished run: two categories, a task that fails, one that fails once and is retried, and a
    worker killed with SIGKILL while it runs a task (requeued and run elsewhere)."""
    tmp = tmp_path_factory.mktemp("report")
    m = vinehpc.Manager(port=0, host="127.0.0.1", keepalive_interval=1, keepalive_timeout=3,
                        run_dir=str(tmp / "run"))
    procs = []

    def start():
        p = subprocess.Popen(worker_cmd(m), stdin=subprocess.DEVNULL, start_new_session=True)
        procs.append(p)
        return p

    try:
        victim = start()
        m.wait_for_workers(1, timeout=30)
        started = tmp / "blocker.started"
        # the first attempt blocks until its worker is killed; the second (elsewhere) is quick
        blocker = vinehpc.Task("if [ -e %s ]; then sleep 0.1; else touch %s; sleep 60; fi" % (started, started))
        blocker.set_category("long")
        ids = [m.submit(blocker)]
        poll(lambda: started.exists(), 30, "the blocker to start on the first worker", m=m)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(10)
        poll(lambda: read_journal(m, "worker lost"), 30, "the manager to see the worker lost", m=m)
        for i in range(N_SHORT):
            ids.append(m.submit(vinehpc.Task("echo short %d" % i).set_category("short")))
        for i in range(N_LONG - 1):
            ids.append(m.submit(vinehpc.Task("sleep 0.3; echo long %d" % i).set_category("long")))
        ids.append(m.submit(vinehpc.Task("echo broken; exit 3").set_category("short")))
        once = tmp / "retried.once"
        ids.append(m.submit(vinehpc.Task("test -e %s || { touch %s; exit 1; }" % (once, once))
                            .set_category("short").set_retries(1)))
        start()
        start()
        got = wait_all(m, len(ids), 120)
        assert sum(not t.successful() for t in got.values()) == 1
    finally:
        m.close()
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)
    return m.run_dir


def journal_truth(run_dir):
    recs = read_journal(run_dir)
    final = [r for r in recs if r.get("event") in ("done", "failed") and r["task"] >= 0]
    subs = [r["time"] for r in recs if r.get("event") == "submitted"]
    return {"recs": recs, "submitted": len([r for r in recs if r.get("event") == "submitted" and r["task"] >= 0]),
            "done": sum(r["event"] == "done" for r in final), "failed": sum(r["event"] == "failed" for r in final),
            "makespan": max(r["time"] for r in final) - min(subs),
            "retries": sum(r.get("event") == "retry" for r in recs),
            "lost": sum(r.get("event") == "worker lost" for r in recs),
            "requeued": sum(r.get("event") == "requeued" for r in recs),
            "joined": sum(r.get("event") == "worker joined" for r in recs)}


def report_json(path):
    p = vinehpc_cli("report", str(path), "--json")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_json_numbers_match_the_journal(run_dir):
    truth = journal_truth(run_dir)
    s = report_json(run_dir)
    t = s["tasks"]
    assert (t["submitted"], t["done"], t["failed"], t["unfinished"]) == (
        truth["submitted"], truth["done"], truth["failed"], 0) == (N_SHORT + N_LONG + 2, N_SHORT + N_LONG + 1, 1, 0)
    assert s["makespan"] == pytest.approx(truth["makespan"], abs=1e-6)
    assert t["retries"] == truth["retries"] == 1
    assert t["requeued"] == truth["requeued"] >= 1
    assert s["workers"]["lost"] == truth["lost"] == 1 and s["workers"]["joined"] == truth["joined"] == 3
    assert t["attempts"] == sum(r.get("event") == "dispatched" for r in truth["recs"])
    cats = {c["name"]: c for c in s["categories"]}
    assert (cats["short"]["done"], cats["short"]["failed"], cats["long"]["done"]) == (N_SHORT + 1, 1, N_LONG)
    # the long tasks sleep 0.3 s (the blocker's second attempt 0.1 s): the workers' measures
    assert (0.3 * (N_LONG - 1) + 0.1) / N_LONG <= cats["long"]["wall_mean"] < 5
    ch = s["core_hours"]
    assert 0 < ch["used"] <= ch["allocated_to_tasks"] <= ch["workers"] and 0 < ch["efficiency"] <= 1
    slow = s["slowest_1pct"]                # 1 % of the finished tasks, rounded up: all of them "long" ones
    assert slow["count"] == math.ceil((N_SHORT + N_LONG + 2) / 100)
    assert {x["category"] for x in slow["tasks"]} == {"long"}
    kinds = {g["kind"]: g for g in s["failure_reasons"]}
    assert {"failed", "retry", "worker lost"} <= set(kinds), kinds
    assert kinds["failed"]["reason"] == "exit code 3" and kinds["retry"]["reason"] == "exit code 1"
    assert [f["exit_code"] for f in s["failed_tasks"]] == [3]
    assert [w["reason"] for w in s["workers_lost"]] and s["unreadable_lines"] == 0


def test_text_summary(run_dir):
    p = vinehpc_cli("report", str(run_dir), "--text")
    assert p.returncode == 0, p.stderr
    truth = journal_truth(run_dir)
    out = p.stdout
    assert "%d submitted: %d done, %d failed" % (truth["submitted"], truth["done"], truth["failed"]) in out
    for word in ("makespan", "core-hours", "efficiency", "slowest 1%", "short", "long", "worker lost"):
        assert word in out, (word, out)
    assert not os.path.exists(os.path.join(run_dir, "report.html"))     # --text alone writes no page


def _chromium():
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    require(exe is not None, "chromium is not installed (apt-get install chromium; tests/run.sh does)")
    return exe


def open_in_chromium(html, tmp_path, size=(1200, 5000)):
    """Open the page as a person would: a screenshot, the DOM after its scripts ran, the console."""
    exe = _chromium()
    shot = tmp_path / "shot.png"
    base = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
            "--user-data-dir=%s" % (tmp_path / "profile"), "--enable-logging=stderr", "--v=0"]
    url = "file://" + os.path.abspath(html)
    p = subprocess.run(base + ["--screenshot=%s" % shot, "--window-size=%d,%d" % size, url],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and shot.exists(), p.stderr[-3000:]
    d = subprocess.run(base + ["--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert d.returncode == 0, d.stderr[-3000:]
    console = [line for line in p.stderr.splitlines() + d.stderr.splitlines() if "CONSOLE" in line]
    return shot, d.stdout, console


def html_tag(dom) -> str:
    """The page's <html ...> element after its scripts ran: the ready and error marks are set there."""
    return re.search(r"<html[^>]*>", dom).group(0)


def assert_not_blank(png, size):
    import matplotlib.image
    img = matplotlib.image.imread(str(png))
    assert img.shape[:2] == (size[1], size[0])
    rgb = (img[:, :, :3] * 255).astype("uint8").reshape(-1, 3)
    colors = {tuple(c) for c in rgb[::97]}
    white = (rgb.min(axis=1) > 245).mean()
    assert len(colors) > 50, "the screenshot has %d colors: blank?" % len(colors)
    assert white < 0.97, "the screenshot is %.1f%% white" % (100 * white)


def test_html_in_chromium(run_dir, tmp_path):
    html = tmp_path / "report.html"
    p = vinehpc_cli("report", str(run_dir), "-o", str(html))
    assert p.returncode == 0, p.stderr
    page = html.read_text()
    for sid in SECTIONS:
        assert 'id="%s"' % sid in page
    assert page.count("<svg") >= 6
    # self-contained: no external script, style sheet, image or font (url(#id): a clip path in an SVG)
    assert not re.search(r'<(script|link|img)[^>]*(src|href)=|url\((?!#)|@import', page)
    assert not re.search(r'(src|href)="(https?:)?//', page)
    shot, dom, console = open_in_chromium(html, tmp_path)
    assert_not_blank(shot, (1200, 5000))
    root = html_tag(dom)
    assert 'data-ready="1"' in root and "data-error" not in root, root
    assert console == [], console
    for sid in SECTIONS:
        assert 'id="%s"' % sid in dom


def test_chromium_check_catches_a_script_error(tmp_path):
    """The check above can fail: a page whose script throws is caught by both the marker and the console."""
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>window.onerror=function(m){document.documentElement.setAttribute("
                   "'data-error',String(m));};</script><p>x</p><script>undefinedFunction();</script></body></html>")
    _, dom, console = open_in_chromium(bad, tmp_path, size=(400, 300))
    assert "data-error" in html_tag(dom) and console


def test_torn_log_is_reported(run_dir, tmp_path):
    """A killed run leaves a torn last line (and no 'manager stopped'): the report still comes."""
    d = tmp_path / "killed"
    d.mkdir()
    lines = open(os.path.join(run_dir, "transactions.jsonl")).read().splitlines(keepends=True)
    stop = max(i for i, line in enumerate(lines) if '"manager stopped"' in line)
    torn = lines[:stop] + [lines[stop - 1][: len(lines[stop - 1]) // 2]]
    (d / "transactions.jsonl").write_text("".join(torn))
    s = report_json(d)
    assert s["unreadable_lines"] == 1 and s["truncated_last_line"] and s["stopped"] is None
    p = vinehpc_cli("report", str(d), "--text", "-o", str(d / "r.html"))
    assert p.returncode == 0 and "torn" in p.stdout and (d / "r.html").stat().st_size > 10000, p.stderr


@pytest.mark.parametrize("case", ["missing", "no journal", "empty", "garbage"])
def test_bad_run_dir_says_what_to_do(tmp_path, case):
    d = tmp_path / "run"
    if case != "missing":
        d.mkdir()
    if case == "empty":
        (d / "transactions.jsonl").write_text("")
    if case == "garbage":
        (d / "transactions.jsonl").write_bytes(os.urandom(5000).replace(b"\n", b"") + b"\nnot json\n")
    p = vinehpc_cli("report", str(d))
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    expect = {"missing": "does not exist", "no journal": "has no transactions.jsonl", "empty": "no journal record",
              "garbage": "no journal record"}[case]
    assert p.stderr.startswith("vinehpc report: ") and expect in p.stderr and "run director" in p.stderr, p.stderr


def test_key_order_does_not_change_the_numbers(run_dir, tmp_path):
    """The core's records are read by position for speed; the same records with other key order (read
    through json) give the same report."""
    d = tmp_path / "sorted"
    d.mkdir()
    with open(d / "transactions.jsonl", "w") as f:
        for r in read_journal(run_dir):
            f.write(json.dumps(r, sort_keys=True) + "\n")
    a, b = report_json(run_dir), report_json(d)
    a.pop("journal"), b.pop("journal")
    assert a == b


def test_report_imports_without_matplotlib(run_dir):
    """vinehpc and the --json/--text paths never import matplotlib (only the HTML page draws)."""
    code = ("import sys, vinehpc, vinehpc.report as r; r.summary(%r); "
            "assert 'matplotlib' not in sys.modules, 'matplotlib imported'" % str(run_dir))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr


def test_ten_thousand_tasks(tmp_path):
    """A synthetic 10,000-task log (benchmarks/report.py's generator): the page and the counts."""
    spec = importlib.util.spec_from_file_location("bench_report", os.path.join(ROOT, "benchmarks", "report.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    truth = bench.synthesize(str(tmp_path / "run"), 10000, workers=50)
    p = vinehpc_cli("report", str(tmp_path / "run"), "-o", str(tmp_path / "r.html"), "--json", timeout=240)
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    assert (s["tasks"]["done"], s["tasks"]["failed"]) == (truth["done"], truth["failed"])
    assert s["workers"]["joined"] == 50 and len(s["categories"]) == 3
    page = (tmp_path / "r.html").read_text()
    assert "attempts: each cell is one worker" in page        # more attempts than the Gantt draws one by one


def test_a_resubmitted_run_appends_a_second_manager(run_dir, tmp_path):
    """A pilot resubmitted into its run directory appends a second manager's records, whose task and
    worker ids start again at 1: both are counted, never mixed."""
    d = tmp_path / "resubmitted"
    d.mkdir()
    recs = read_journal(run_dir)
    with open(d / "transactions.jsonl", "w") as f:
        for shift in (0, 1000):
            for r in recs:
                f.write(json.dumps(dict(r, time=r["time"] + shift)) + "\n")
    one, two = report_json(run_dir), report_json(d)
    assert two["runs"] == 2
    for k in ("submitted", "done", "failed", "attempts", "retries", "requeued"):
        assert two["tasks"][k] == 2 * one["tasks"][k], k
    assert two["workers"]["joined"] == 6 and two["workers"]["lost"] == 2
    assert two["core_hours"]["used"] == pytest.approx(2 * one["core_hours"]["used"])
    assert two["workers"]["peak_connected"] == one["workers"]["peak_connected"]


def test_names_are_text_not_markup(tmp_path):
    """A category named like TeX or HTML is drawn and listed as it is (and breaks nothing)."""
    name = "$\\nosuch_1$ <b>&amp;"          # not even valid TeX
    d = tmp_path / "run"
    d.mkdir()
    recs = [{"event": "manager started", "time": 100.0},
            {"worker": 1, "host": "h", "resources": {"cores": 1}, "event": "worker joined", "time": 100.1},
            {"task": 1, "kind": "Task", "category": name, "event": "submitted", "time": 100.2},
            {"task": 1, "worker": 1, "host": "h", "attempt": 1, "event": "dispatched", "time": 100.3},
            {"task": 1, "worker": 1, "result": "failed", "exit_code": 1, "reason": "<script>alert(1)</script>",
             "wall": 0.5, "attempts": 1, "category": name, "allocated": {"cores": 1},
             "measured": {"memory": 10.0, "cores": 0.5, "wall": 0.5, "disk": 0.0}, "event": "failed", "time": 101.0}]
    (d / "transactions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    p = vinehpc_cli("report", str(d), "-o", str(tmp_path / "r.html"))
    assert p.returncode == 0, p.stderr
    page = (tmp_path / "r.html").read_text()
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "$\\nosuch_1$ &lt;b&gt;&amp;amp;" in page


def test_an_attempt_starts_at_its_started_record(tmp_path):
    """With a `started` record the attempt starts there; without (an older log), at time - wall."""
    from vinehpc.report.aggregate import load

    def run(with_started):
        recs = [{"event": "manager started", "time": 100.0},
                {"worker": 1, "host": "h", "resources": {"cores": 1}, "event": "worker joined", "time": 100.0},
                {"task": 1, "kind": "Task", "category": "c", "event": "submitted", "time": 100.0},
                {"task": 1, "worker": 1, "host": "h", "attempt": 1, "event": "dispatched", "time": 101.0}]
        if with_started:
            recs.append({"task": 1, "worker": 1, "attempt": 1, "queued": True, "event": "started", "time": 103.0})
        recs.append({"task": 1, "worker": 1, "result": "success", "exit_code": 0, "reason": None, "wall": 0.5,
                     "attempts": 1, "category": "c", "allocated": {"cores": 1},
                     "measured": {"memory": 1.0, "cores": 0.5, "wall": 0.5, "disk": 0.0}, "event": "done",
                     "time": 104.0})
        d = tmp_path / ("run%d" % with_started)
        d.mkdir()
        # written as the core writes them (compact, keys in its order): the fast path reads them
        (d / "transactions.jsonl").write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in recs))
        return [(s, e) for _, s, e, _, _ in load(str(d)).gantt]
    assert run(True) == [(103.0, 104.0)]
    assert run(False) == [(103.5, 104.0)]
