#!/usr/bin/env python3
# TaskVine style: functions, classes and instances defined in the script travel as arguments.
import dataclasses

import vinehpc as vine


@dataclasses.dataclass
class Person:
    name: str
    born: int


def calc_age(p, year=2026):
    return year - p.born


def apply(fn, *args, **kwargs):
    return fn(*args, **kwargs)


def shout(s):
    return s.upper() + "!"


m = vine.Manager(9123)
people = [Person("ada", 1815), Person("grace", 1906)]
tasks = [vine.PythonTask(apply, calc_age, p) for p in people]           # a script function as an argument
tasks.append(vine.PythonTask(apply, shout, "hi"))
tasks.append(vine.PythonTask(apply, lambda x: Person(x, 2000), "new"))  # a lambda returning a script class
tasks.append(vine.PythonTask(calc_age, p=people[0], year=1900))        # a script instance as a keyword
for t in tasks:
    m.submit(t)
while not m.empty():
    t = m.wait(5)
    if t:
        assert t.successful(), (t.result, t.reason, t.output)
outs = [t.output for t in tasks]
assert outs[:3] == [211, 120, "HI!"], outs
assert outs[3].name == "new" and outs[3].born == 2000, outs[3]
assert outs[4] == 85, outs[4]
m.close()
print("compat_args_by_value: ok")
