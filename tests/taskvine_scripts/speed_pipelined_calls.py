"""TaskVine-style script: many tiny FunctionCalls and PythonTasks in flight at once (workers keep
several waiting inside each busy interpreter), some cancelled while they wait there; every
result that comes back must be its own, and every call not cancelled must come back."""
import vinehpc as vine


def square(x):
    return x * x


def main():
    m = vine.Manager(port=0)
    m.install_library(m.create_library_from_functions("speed-lib", square, exec_mode="direct"))
    n = 1500
    calls = {}
    for i in range(n):
        t = vine.FunctionCall("speed-lib", "square", i) if i % 3 else vine.PythonTask(square, i)
        m.submit(t)
        calls[t.id] = (t, i)
    cancelled = set()
    for tid in list(calls)[n // 2::50]:          # some of them, likely waiting on a worker by now
        m.cancel(calls[tid][0])
        cancelled.add(tid)
    got = {}
    while not m.empty():
        t = m.wait(10)
        assert t is not None, ("a call did not come back", m.stats, len(got), sorted(set(calls) - set(got) - cancelled)[:10])
        if t.id in cancelled and not t.successful():
            continue            # (one that had finished before the cancel arrived comes back done)
        assert t.successful(), (t.id, t.result, t.reason)
        got[t.id] = t.output
    for tid, (t, i) in calls.items():
        if tid not in cancelled or tid in got:
            assert got.get(tid) == i * i, (tid, got.get(tid), i)
    print("%d results, %d cancelled: all correct" % (len(got), len(cancelled)))
    m.close()


if __name__ == "__main__":
    main()
