"""First come, first served: the first worker with room (least loaded among equals)."""


class FCFS:
    name = "fcfs"

    @staticmethod
    def least_loaded(ts) -> bool:
        """choose() takes the least loaded candidate (the longest at that load among equals) for this task: the
        core then finds it in its index of workers by load without building the candidate list."""
        return True

    def choose(self, task, candidates):
        best = None
        for w in candidates:
            if best is None or (w.outstanding, w.since) < (best.outstanding, best.since):
                best = w
        return best
