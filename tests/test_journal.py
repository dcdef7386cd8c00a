"""The run journal (vinehpc/journal.py): every record written once, in order, whatever the flushes."""
import json
import threading

from vinehpc import journal
from vinehpc.journal import Journal


def lines(path):
    with open(path) as f:
        return [json.loads(x) for x in f]


def test_records_beyond_what_is_kept_unencoded_come_out_in_order(tmp_path):
    """A long loop turn's records are encoded PENDING at a time as they come (the collector must not
    see thousands waiting); the file holds each once, in the order written, times included."""
    path = str(tmp_path / "transactions.jsonl")
    j = Journal(path)
    n = 3 * journal.PENDING + 7
    for i in range(n):
        j.write({"event": "x", "i": i, "nested": {"cores": i}} if i % 3 else {"event": "y", "i": i, "time": 5.0})
        if i == journal.PENDING // 2:
            j.flush()
    assert len(lines(path)) < n          # (not all written yet: kept, some of them encoded)
    j.flush()
    got = lines(path)
    assert [r["i"] for r in got] == list(range(n))
    assert all(r["time"] == 5.0 for r in got if r["event"] == "y")
    assert all(r["nested"] == {"cores": r["i"]} and r["time"] > 1e9 for r in got if r["event"] == "x")
    j.close()


def test_two_writing_threads_lose_nothing(tmp_path):
    """The user's thread writes a record now and then while the I/O thread writes and flushes."""
    path = str(tmp_path / "transactions.jsonl")
    j = Journal(path)
    per = 2 * journal.PENDING + 3

    def writer(name):
        for i in range(per):
            j.write({"event": name, "i": i})
            if name == "io" and i % 100 == 0:
                j.flush()
    threads = [threading.Thread(target=writer, args=(name,)) for name in ("io", "user")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    j.close()
    got = lines(path)
    for name in ("io", "user"):
        assert [r["i"] for r in got if r["event"] == name] == list(range(per))


def test_the_time_a_record_is_given_is_the_time_its_line_says(tmp_path):
    """The live figures (m.stats, status.json) are fed the time write() returns; a replay of the
    log reads the line's: they must be the same float, or a rate rounded to 3 digits can differ
    in its last digit between the two (test_status compares them)."""
    j = Journal(str(tmp_path / "j.jsonl"))
    given = [j.write({"event": "e", "i": i}) for i in range(2000)]
    j.close()
    said = [json.loads(line)["time"] for line in open(tmp_path / "j.jsonl")]
    assert said == given


def test_what_orjson_refuses_is_written_by_json_and_strange_values_as_json_would(tmp_path, monkeypatch):
    """orjson encodes the lines; a value it refuses (an int past 64 bits, a non-string key, a lone
    surrogate: undecodable task output) goes through json's encoder, and what json writes with
    str() (a datetime, a set) is written with str() still: nothing is lost, no line is torn."""
    import datetime
    when = datetime.datetime(2026, 12, 6, 12, 0, 0)
    recs = [{"event": "big", "n": 2 ** 70}, {"event": "keys", "by": {1: "a", 2: "b"}},
            {"event": "bytes", "output": "caf\udce9 \u00e9"}, {"event": "str", "when": when, "s": {3}},
            {"event": "plain", "i": 1}]
    for use_orjson in (True, False):
        if not use_orjson:
            monkeypatch.setattr(journal, "_encode", lambda rec: journal._json(rec).encode())
        path = tmp_path / ("j%d.jsonl" % use_orjson)
        j = Journal(str(path))
        for r in recs:
            j.write(dict(r))
        j.close()
        got = {r["event"]: r for r in lines(path)}
        assert got["big"]["n"] == 2 ** 70
        assert got["keys"]["by"] == {"1": "a", "2": "b"}
        assert got["bytes"]["output"] == "caf\udce9 \u00e9"
        assert got["str"]["when"] == str(when) and got["str"]["s"] == "{3}"
        assert got["plain"]["i"] == 1 and len(got) == 5


def test_numbers_of_subclasses_are_written_as_numbers(tmp_path):
    """numpy's float64 (a float subclass), an IntEnum, a defaultdict: written as json writes them
    (a number, a number, an object), not as their str()."""
    import collections
    import enum
    import numpy as np

    class Level(enum.IntEnum):
        HIGH = 3
    j = Journal(str(tmp_path / "j.jsonl"))
    j.write({"event": "x", "f": np.float64(1.5), "i": Level.HIGH, "d": collections.defaultdict(list, a=[1])})
    j.close()
    (r,) = lines(tmp_path / "j.jsonl")
    assert r["f"] == 1.5 and type(r["f"]) is float
    assert r["i"] == 3 and type(r["i"]) is int
    assert r["d"] == {"a": [1]}
