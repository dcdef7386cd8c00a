#!/usr/bin/env python3
# TaskVine style: watch a task's growing output from the manager while the task runs.
import os
import tempfile

import vinehpc as vine

m = vine.Manager(9123)
where = tempfile.mkdtemp()
out = m.declare_file(os.path.join(where, "progress.txt"))
flag = os.path.join(where, "seen")
# the task writes a line, then waits until the manager has seen it before it finishes
t = vine.Task("echo step-1 > progress.txt; i=0; while [ ! -e %s ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); "
              "done; echo step-2 >> progress.txt" % flag)
t.add_output(out, "progress.txt", watch=True)
m.submit(t)
seen_while_running = False
while not m.empty():
    done = m.wait(0.2)
    if done is None and not seen_while_running:
        try:
            with open(out.source) as f:
                seen_while_running = f.read() == "step-1\n"
        except FileNotFoundError:
            pass
        if seen_while_running:
            open(flag, "w").close()
assert seen_while_running, "the watched output did not grow at the manager while the task ran"
assert t.successful(), (t.result, t.reason)
with open(out.source) as f:
    assert f.read() == "step-1\nstep-2\n"
m.close()
print("compat_watch: ok")
