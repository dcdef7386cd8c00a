"""What a worker offers: cores, memory (MB), disk (MB), gpus; detected unless given."""
from __future__ import annotations

import os
import shutil


def _gpus() -> int:
    v = os.environ.get("CUDA_VISIBLE_DEVICES")
    if v is not None:
        return len([x for x in v.split(",") if x.strip() and x.strip() != "-1"])
    return 0


def detect(workdir, *, cores=None, memory=None, disk=None, gpus=None) -> dict:
    if cores is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:
            cores = os.cpu_count() or 1
    if memory is None:
        try:
            import psutil
            memory = psutil.virtual_memory().total // (1 << 20)
        except ImportError:
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20)
    if disk is None:
        disk = shutil.disk_usage(workdir).free // (1 << 20)
    if gpus is None:
        gpus = _gpus()
    for k, v in (("cores", cores), ("memory", memory), ("disk", disk), ("gpus", gpus)):
        if not isinstance(v, int) or v < 0 or (k == "cores" and v < 1):
            raise ValueError("worker %s must be a %s integer, got %r" % (k, "positive" if k == "cores" else "non-negative", v))
    return {"cores": cores, "memory": memory, "disk": disk, "gpus": gpus}
