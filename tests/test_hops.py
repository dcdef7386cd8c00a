"""benchmarks/hops.py, the round trip taken apart: every point it notes is still reached (its
wrappers name methods of the worker and the server: a rename must fail here, not leave the
instrument silently empty), by real worker and interpreter processes.  Never timings."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("submit", "io_wake", "submit_turn", "to_worker", "task_in", "interpreter_wake", "call", "worker_wake",
         "result_out", "to_manager", "result_turn", "user_wake")


@pytest.mark.timeout(240)
@pytest.mark.parametrize("kind,link", [("call", "unix"), ("python", "unix"), ("call", "tcp")])
def test_every_step_of_every_call_is_found(kind, link, tmp_path):
    calls = 40
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "hops.py"), "--calls", str(calls),
                        "--kind", kind, "--json"] + (["--tcp"] if link == "tcp" else []), capture_output=True, text=True, timeout=200, cwd=str(tmp_path),
                       env=dict(os.environ, TMPDIR=str(tmp)))
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout
    r = json.loads(out[:out.rindex("\nHOPS ")])
    # a call is left out only when one of its points is missing or out of order: none should be
    assert r["rounds_ok"] == calls, r
    assert r["link"] == link
    assert list(r["steps_us"]) == list(STEPS)
    assert all(v > 0 for v in r["steps_us"].values()), r["steps_us"]
    # the steps are consecutive: their medians add up to about the median round trip
    assert 0.5 < sum(r["steps_us"].values()) / 1e3 / r["total_ms"] < 1.5, r
    # every wake is found on one CPU or the other (the notes say where each point ran)
    for k, v in r["wakes"].items():
        assert 0.0 <= v["same_cpu_share"] <= 1.0 and (v["same_cpu_us"] or v["other_cpu_us"]), (k, v)
    line = out[out.rindex("\nHOPS ") + 1:].split()
    assert line[1:4] == ["kind=%s" % kind, "link=%s" % link, "calls=%d" % calls]
    assert {kv.split("=")[0] for kv in line[5:]} == {s + "_us" for s in STEPS}
    assert not [d for d in os.listdir(tmp) if d.startswith("vinehpc-hops-")], "notes left behind"
