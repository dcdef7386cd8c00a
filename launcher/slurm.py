"""What the allocation gives this process, from Slurm's environment as read into
vinehpc.config.Slurm (Settings.slurm), psutil/affinity otherwise.

Pure functions of a Slurm record, so they are testable without Slurm.
"""
from __future__ import annotations

import os


def cpus_for_rank(alloc, ranks_on_node: int = 1) -> int:
    """Cores this rank may use: --cpus-per-task, else the node's CPUs shared by its ranks."""
    if alloc.cpus_per_task:
        return alloc.cpus_per_task
    on_node = alloc.cpus_on_node or alloc.job_cpus_per_node
    if on_node is None:
        try:
            on_node = len(os.sched_getaffinity(0))
        except AttributeError:
            on_node = os.cpu_count() or 1
    return max(1, on_node // max(1, ranks_on_node))


def memory_for_rank(alloc, ranks_on_node: int = 1, cpus: int = 1) -> int | None:
    """MB this rank may use: --mem-per-cpu x cpus, else --mem shared by the node's ranks, else None."""
    if alloc.mem_per_cpu:
        return alloc.mem_per_cpu * cpus
    if alloc.mem_per_node:
        return alloc.mem_per_node // max(1, ranks_on_node)
    return None


def job_label(alloc) -> str:
    return "job %s (%s)" % (alloc.job_id, alloc.job_name or "?") if alloc.job_id else "no Slurm job"
