"""TaskVine-style script in the shape of TaskVine's function-call example: a library from
functions with hoisted modules (and the older imports= form), 150 FunctionCalls, the total checked."""
import math
from random import uniform
from time import sleep as time_sleep

import vinehpc as vine


def cube(x):
    time_sleep(uniform(0.00001, 0.0001))
    return math.pow(x, 3)


def divide(dividend, divisor):
    return dividend / math.sqrt(divisor)


def double(x):
    import math as m
    return m.prod([x, 2])


def main():
    q = vine.Manager(port=0)
    print(f"manager listening on port {q.port}")
    libtask = q.create_library_from_functions("test-library", divide, double, cube, hoisting_modules=[math],
                                              imports={"random": {"uniform": ""}, "time": {"sleep": "time_sleep"}},
                                              add_env=False)
    q.install_library(libtask)
    tasks = 50
    for _ in range(tasks):
        q.submit(vine.FunctionCall("test-library", "divide", 2, 2 ** 2))
        q.submit(vine.FunctionCall("test-library", "double", 3))
        q.submit(vine.FunctionCall("test-library", "cube", 4))
    total = 0
    while not q.empty():
        t = q.wait(5)
        if t:
            assert t.successful(), (t.result, t.reason)
            total += t.output
    expected = tasks * (divide(2, 2 ** 2) + double(3) + cube(4))
    print(f"Total:    {total}")
    print(f"Expected: {expected}")
    assert total == expected


if __name__ == "__main__":
    main()
