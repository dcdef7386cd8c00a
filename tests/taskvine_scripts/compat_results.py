#!/usr/bin/env python3
# TaskVine style: results of failing functions and commands are data, not exceptions.
import vinehpc as vine


def divide(a, b):
    return a / b


m = vine.Manager(port=0)
ok = vine.PythonTask(divide, 6, 3)
bad = vine.PythonTask(divide, 1, 0)
cmd = vine.Task("echo partial; exit 7")
good = vine.Task("true")
for t in (ok, bad, cmd, good):
    m.submit(t)

done = {}
while not m.empty():
    t = m.wait(5)
    if t:
        done[t.id] = t        # a ported result loop: reads every output without try/except
        print(t.id, t.result, t.exit_code, repr(t.output))

assert ok.output == 2.0 and ok.successful()
assert isinstance(bad.output, ZeroDivisionError), bad.output        # the exception, as in TaskVine
assert bad.exception is bad.output and not bad.successful()
try:
    bad.output_or_raise()
except vine.TaskError as e:
    assert isinstance(e.__cause__, ZeroDivisionError)
else:
    raise AssertionError("output_or_raise did not raise")

# a command exiting non-zero ran to its end: result "success", the code in exit_code
assert cmd.result == "success" and cmd.exit_code == 7, (cmd.result, cmd.exit_code)
assert cmd.completed() and not cmd.successful()
assert "partial" in cmd.std_output
assert good.completed() and good.successful() and good.exit_code == 0

# a task that produced nothing (killed over its time limit): output is a PythonTaskNoResult
slow = vine.PythonTask(__import__("time").sleep, 30)
slow.set_time_max(1)
m.submit(slow)
t = m.wait_for_task_id(slow.id, 30)
assert t is slow and slow.result == "resource exhaustion", slow.result
assert isinstance(slow.output, vine.PythonTaskNoResult), slow.output
m.close()
print("compat_results: ok")
