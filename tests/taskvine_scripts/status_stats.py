#!/usr/bin/env python3
# TaskVine style: a script reads m.stats (attributes, TaskVine's field names) as it goes.
import vinehpc as vine

m = vine.Manager(port=0)
for i in range(20):
    t = vine.Task("exit %d" % (1 if i == 0 else 0))
    t.set_category("even" if i % 2 == 0 else "odd")
    m.submit(t)

while not m.empty():
    t = m.wait(5)
    s = m.stats
    # whatever the moment: every submitted task is waiting, running or done
    assert s.tasks_waiting + s.tasks_running + s.tasks_done == s.tasks_submitted, dict(s)

s = m.stats
print("done %d, failed %d, workers %d" % (s.tasks_done, s.tasks_failed, s.workers_connected))
assert s.tasks_submitted == s.tasks_done == 20 and s.tasks_failed == 1, dict(s)
assert s["tasks_done"] == s.tasks_done and s.workers_connected >= 1       # keys and attributes alike
assert m.stats_category("even")["done"] + m.stats_category("odd")["done"] >= 19
m.close()
