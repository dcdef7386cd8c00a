"""First come, first served: the first worker with room (least loaded among equals)."""


class FCFS:
    name = "fcfs"

    def choose(self, task, candidates):
        best = None
        for w in candidates:
            if best is None or w.outstanding < best.outstanding:
                best = w
        return best
