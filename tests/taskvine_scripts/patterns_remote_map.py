"""TaskVine-style script: the remote_* helpers over an installed library."""
import vinehpc as vine


def square(x):
    return x * x


def total(xs):
    return sum(xs)


if __name__ == "__main__":
    m = vine.Manager(port=0)
    lib = m.create_library_from_functions("helpers", square, total, exec_mode="direct")
    m.install_library(lib)
    assert m.remote_map("square", [1, 2, 3, 4], "helpers", "x") == [1, 4, 9, 16]
    assert m.remote_pair("total", [1, 2], [10], "helpers", "x") == [11, 12]
    assert m.remote_tree_reduce("total", list(range(10)), "helpers", "x", 3) == 45
    print("remote patterns: ok")
