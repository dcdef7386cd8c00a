"""What the allocation gives this process: read from Slurm's environment (psutil otherwise).

Pure functions of an environment mapping, so they are testable without Slurm.
"""
from __future__ import annotations

import os


def _int(env, name):
    v = env.get(name, "")
    head = v.split("(")[0].split(",")[0]     # "2(x3),1" -> "2"
    try:
        return int(head)
    except ValueError:
        return None


def in_allocation(env=os.environ) -> bool:
    return bool(env.get("SLURM_JOB_ID"))


def job_id(env=os.environ) -> str | None:
    return env.get("SLURM_JOB_ID") or None


def node_name(env=os.environ) -> str | None:
    return env.get("SLURMD_NODENAME") or None


def cpus_for_rank(env=os.environ, ranks_on_node: int = 1) -> int:
    """Cores this rank may use: --cpus-per-task, else the node's CPUs shared by its ranks."""
    per_task = _int(env, "SLURM_CPUS_PER_TASK")
    if per_task:
        return per_task
    on_node = _int(env, "SLURM_CPUS_ON_NODE") or _int(env, "SLURM_JOB_CPUS_PER_NODE")
    if on_node is None:
        try:
            on_node = len(os.sched_getaffinity(0))
        except AttributeError:
            on_node = os.cpu_count() or 1
    return max(1, on_node // max(1, ranks_on_node))


def memory_for_rank(env=os.environ, ranks_on_node: int = 1, cpus: int = 1) -> int | None:
    """MB this rank may use: --mem-per-cpu x cpus, else --mem shared by the node's ranks, else None."""
    per_cpu = _int(env, "SLURM_MEM_PER_CPU")
    if per_cpu:
        return per_cpu * cpus
    per_node = _int(env, "SLURM_MEM_PER_NODE")
    if per_node:
        return per_node // max(1, ranks_on_node)
    return None


def job_label(env=os.environ) -> str:
    jid = env.get("SLURM_JOB_ID")
    return "job %s (%s)" % (jid, env.get("SLURM_JOB_NAME", "?")) if jid else "no Slurm job"
