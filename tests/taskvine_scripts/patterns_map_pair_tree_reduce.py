"""TaskVine-style script: Manager.map, pair and tree_reduce, as in TaskVine's examples
(functions defined in the script, results printed and checked)."""
import datetime

import vinehpc as vine

year = datetime.date.today().year


def calc_age(x):
    return year - x


def make_name(namepair):
    return namepair[0] + " " + namepair[1]


def find_max(nums):
    return max(nums)


if __name__ == "__main__":
    m = vine.Manager(port=0)
    print("listening on port", m.port)
    births = [2017, 2019, 2015, 2018, 2020]
    ages = m.map(calc_age, births)
    print(ages)
    assert ages == [year - b for b in births]
    assert m.map(calc_age, births, 2) == ages
    names = m.pair(make_name, ["Joe", "Sarah"], ["Smith", "Long"])
    print(names)
    assert names == ["Joe Smith", "Joe Long", "Sarah Smith", "Sarah Long"]
    for nums in ([1, 10, 10000, 100, 1000], [57, 90, 68, 72, 45], [4268, 643, 985, 6543]):
        top = m.tree_reduce(find_max, nums)
        print(top)
        assert top == max(nums)
    assert m.tree_reduce(lambda xs: sum(xs), list(range(100)), 8) == sum(range(100))
    print("patterns: ok")
