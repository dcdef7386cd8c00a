"""Prefer the worker that already holds the most bytes of the task's inputs (the default).

Ties go to the least loaded worker, so with no cached inputs this is FCFS spreading work.
A temp input counts double: moving it costs a fetch through the manager.
"""


class PreferCachedFiles:
    name = "files"

    # A candidate holding any input (key >= 1) beats every one holding none (key 0), and among
    # those the least loaded wins: the core then looks only at the workers its index says hold an
    # input, and takes the least loaded worker from its index by load when none of them fits
    # (see scheduler/__init__.py).
    prefers_holders = True

    @staticmethod
    def least_loaded(ts) -> bool:
        """Without inputs every candidate holds 0 bytes of them: the least loaded one is chosen."""
        return not ts.inputs

    def choose(self, task, candidates):
        inputs = task.inputs      # a TaskState: [(cachename, size, is_temp)]
        best, best_key = None, None
        for w in candidates:
            cached = 0
            if inputs:
                for name, size, is_temp in inputs:
                    if name in w.cached:
                        cached += (2 * size + 1) if is_temp else (size + 1)
            key = (cached, -w.outstanding, -w.since)
            if best is None or key > best_key:
                best, best_key = w, key
        return best
