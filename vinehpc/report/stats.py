"""Per-category statistics of a run: counts, sums and log-spaced histograms (fixed size whatever the number of tasks)."""
from __future__ import annotations

import math

# log-spaced histogram bins: 10 a decade
WALL_LO, WALL_DECADES = 1e-3, 9        # 1 ms .. 1e6 s
MEM_LO, MEM_DECADES = 1.0, 7           # 1 MB .. 10 TB
PER_DECADE = 10


def log_bin(x, lo, decades) -> int:
    if not x or x <= lo:
        return 0
    return min(int(math.log10(x / lo) * PER_DECADE), decades * PER_DECADE - 1)


def bin_edges(lo, decades) -> list:
    return [lo * 10 ** (i / PER_DECADE) for i in range(decades * PER_DECADE + 1)]


class Category:
    """What the report says of one category: counts, duration and memory histograms, sums of
    allocated and measured resources (for the waste)."""
    __slots__ = ("name", "done", "failed", "attempts", "wall_hist", "mem_hist", "wall_sum", "wall_max",
                 "core_s_alloc", "core_s_used", "mem_alloc_n", "mem_alloc_sum", "mem_used_n", "mem_used_sum",
                 "mem_used_max", "mem_waste_mb_s", "disk_alloc_sum", "disk_used_sum", "disk_n")

    def __init__(self, name):
        self.name = name
        self.done = self.failed = self.attempts = 0
        self.wall_hist = [0] * (WALL_DECADES * PER_DECADE)
        self.mem_hist = [0] * (MEM_DECADES * PER_DECADE)
        self.wall_sum = self.wall_max = 0.0
        self.core_s_alloc = self.core_s_used = 0.0
        self.mem_alloc_n = self.mem_used_n = self.disk_n = 0
        self.mem_alloc_sum = self.mem_used_sum = self.mem_used_max = self.mem_waste_mb_s = 0.0
        self.disk_alloc_sum = self.disk_used_sum = 0.0

    def summary(self) -> dict:
        n = self.done + self.failed
        return {"name": self.name, "done": self.done, "failed": self.failed, "attempts": self.attempts,
                "wall_mean": self.wall_sum / n if n else None, "wall_max": self.wall_max,
                "wall_p50": hist_quantile(self.wall_hist, WALL_LO, WALL_DECADES, 0.5),
                "wall_p99": hist_quantile(self.wall_hist, WALL_LO, WALL_DECADES, 0.99),
                "core_hours_allocated": self.core_s_alloc / 3600, "core_hours_used": self.core_s_used / 3600,
                "memory_allocated_mean": self.mem_alloc_sum / self.mem_alloc_n if self.mem_alloc_n else None,
                "memory_used_mean": self.mem_used_sum / self.mem_used_n if self.mem_used_n else None,
                "memory_used_max": self.mem_used_max if self.mem_used_n else None,
                "memory_wasted_gb_hours": self.mem_waste_mb_s / 1024 / 3600,
                "disk_allocated_mean": self.disk_alloc_sum / self.disk_n if self.disk_n else None,
                "disk_used_mean": self.disk_used_sum / self.disk_n if self.disk_n else None}


def hist_quantile(hist, lo, decades, q):
    """Upper edge of the log bin holding the q-quantile (None when empty)."""
    n = sum(hist)
    if not n:
        return None
    want, acc = q * n, 0
    for i, c in enumerate(hist):
        acc += c
        if acc >= want:
            return lo * 10 ** ((i + 1) / PER_DECADE)
    return lo * 10 ** decades
