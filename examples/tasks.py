#!/usr/bin/env python3
"""Estimate pi by Monte Carlo on many workers, and count lines of data files.

    vinehpc run examples/tasks.py [SAMPLES_PER_TASK]
"""
import math, os, random, sys, tempfile
from collections import Counter

import vinehpc
from vinehpc import Manager, PythonTask, Task


def estimate_pi(seed, samples):
    """Monte Carlo estimate of pi from `samples` points; reproducible from `seed`."""
    rng = random.Random(seed)
    inside = sum(rng.random() ** 2 + rng.random() ** 2 <= 1.0 for _ in range(samples))
    return 4.0 * inside / samples


def main(argv):
    samples = int(argv[1]) if len(argv) > 1 else 100_000
    n_pi, n_files = 20, 3
    # Work in a fresh directory so the example runs from any cwd.
    os.chdir(tempfile.mkdtemp(prefix="vine-example-"))
    print("working directory:", os.getcwd())

    m = Manager()  # under `vinehpc run` it gets that run's local workers
    expected, kinds, errors = {}, {}, []
    for seed in range(n_pi):  # one PythonTask per independent random stream
        t = PythonTask(estimate_pi, seed, samples)
        m.submit(t)
        kinds[t.id] = "pi"
    for i in range(n_files):  # shell tasks: count the lines of a data file
        lines = 100 * (i + 1)
        with open(f"data{i}.dat", "w") as f:
            f.writelines(f"{random.gauss(0, 1):.6f}\n" for _ in range(lines))
        t = Task("wc -l < input.dat > count.txt")
        t.add_input(m.declare_file(f"data{i}.dat", cache=True), "input.dat")
        t.add_output(m.declare_file(f"count{i}.txt"), "count.txt")
        t.set_cores(1)
        m.submit(t)
        kinds[t.id], expected[t.id] = f"count{i}.txt", lines

    estimates, hosts = [], Counter()
    while not m.empty():
        done = m.wait(5)  # a finished Task, or None on timeout
        if done is None:
            continue  # nothing finished yet; keep waiting
        hosts[done.hostname] += 1
        if not done.successful():
            errors.append(f"task {done.id} failed: exit {done.exit_code}\n{done.std_output}")
        elif kinds[done.id] == "pi":
            estimates.append(done.output)
        elif int(open(kinds[done.id]).read()) != expected[done.id]:
            errors.append(f"task {done.id}: wrong line count in {kinds[done.id]}")

    # Summary: where tasks ran, and the combined estimate with its standard error.
    print(f"{'host':<24}{'tasks':>6}")
    for host, count in hosts.most_common():
        print(f"{str(host):<24}{count:>6}")
    pi_hat = sum(estimates) / max(len(estimates), 1)
    stderr = math.sqrt(math.pi * (4 - math.pi) / (samples * n_pi))
    print(f"pi ~ {pi_hat:.5f} +/- {stderr:.5f} from {len(estimates)} tasks")
    if len(estimates) != n_pi or abs(pi_hat - math.pi) > 5 * stderr:
        errors.append(f"pi estimate off: {pi_hat} from {len(estimates)}/{n_pi} tasks")

    # The same function through a concurrent.futures-style Executor:
    # remote results must equal local ones exactly (same seeds).
    with vinehpc.Executor() as ex:
        remote = list(ex.map(estimate_pi, range(4), [1000] * 4))
    if remote != [estimate_pi(s, 1000) for s in range(4)]:
        errors.append(f"Executor.map returned {remote}")

    for e in errors:
        print("ERROR:", e, file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
