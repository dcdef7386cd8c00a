#!/usr/bin/env python3
# TaskVine style: instances of a class from a helper module next to the script, passed as arguments.
import vinehpc as vine
from compat_helpers.shapes import Square


def total_area(shapes):
    return sum(s.area() for s in shapes)


m = vine.Manager(port=0)
t = vine.PythonTask(total_area, [Square(2), Square(3)])
m.submit(t)
t = m.wait(60)
assert t is not None and t.successful(), t and (t.result, t.reason, t.output)
assert t.output == 13, t.output
back = vine.PythonTask(lambda n: Square(n), 4)      # and one returned from a worker
m.submit(back)
back = m.wait(60)
assert back.output == Square(4), back.output
m.close()
print("compat_helper_types: ok")
