"""TaskVine-style serverless script: a library of functions installed once, FunctionCalls by name,
in both execution modes, with hoisted imports, a context and function slots (asserts its results)."""
import math
import os

import vinehpc as vine


def divide(dividend, divisor):
    return dividend / math.sqrt(divisor)


def double(x):
    import math as m
    return m.prod([x, 2])


def scaled(x):
    return vine.load_variable_from_library("scale") * x


def make_scale(base, power=1):
    return {"scale": base ** power}


def fails(x):
    raise ValueError("bad value %r" % (x,))


def main():
    m = vine.Manager(port=0)
    print("listening on port", m.port)
    for mode in ("direct", "fork"):
        name = "test-library-" + mode
        lib = m.create_library_from_functions(name, divide, double, scaled, fails, hoisting_modules=[math],
                                              add_env=False, exec_mode=mode,
                                              library_context_info=[make_scale, [2], {"power": 3}])
        lib.set_function_slots(2)
        m.install_library(lib)
        for _ in range(30):
            m.submit(vine.FunctionCall(name, "divide", 2, 2 ** 2))
            m.submit(vine.FunctionCall(name, "double", 3))
            m.submit(vine.FunctionCall(name, "scaled", 1))
        bad = vine.FunctionCall(name, "fails", 7)
        m.submit(bad)
        total = 0
        while not m.empty():
            t = m.wait(5)
            if t and t is not bad:
                assert t.successful(), (t.result, t.reason)
                total += t.output
        assert total == 30 * (divide(2, 4) + double(3) + 8), total
        assert not bad.successful() and isinstance(bad.exception, ValueError), bad.exception
        m.remove_library(name)
    try:
        m.submit(vine.FunctionCall("test-library-fork", "double", 1))
        raise AssertionError("a call to a removed library was accepted")
    except ValueError as e:
        assert "install_library" in str(e)
    print("serverless library: ok (pid %d)" % os.getpid())


if __name__ == "__main__":
    main()
