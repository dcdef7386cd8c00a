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
