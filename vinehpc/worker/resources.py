"""What a worker offers: cores, memory (MB), disk (MB), gpus; detected unless given."""
from __future__ import annotations

import os
import shutil
import subprocess


def gpu_ids(run=None) -> list:
    """The GPUs this worker may use, as CUDA device identifiers (indices or GPU-/MIG- UUIDs).

    CUDA_VISIBLE_DEVICES when set (as CUDA reads it: up to the first entry that is not a
    device -- "", "-1", Slurm's "NoDevFiles" mean none); else one per "GPU n: ..." line of
    `nvidia-smi -L`; else none."""
    v = os.environ.get("CUDA_VISIBLE_DEVICES")
    if v is not None:
        ids = []
        for x in v.split(","):
            x = x.strip()
            if not (x.isdigit() or x.startswith(("GPU-", "MIG-"))):
                break
            ids.append(x)
        return ids
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    run = run or subprocess.run
    try:
        r = run([exe, "-L"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    if r.returncode != 0:
        return []
    return [str(i) for i, line in enumerate(ln for ln in r.stdout.splitlines() if ln.startswith("GPU "))]


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
        gpus = len(gpu_ids())
    for k, v in (("cores", cores), ("memory", memory), ("disk", disk), ("gpus", gpus)):
        if not isinstance(v, int) or v < 0 or (k == "cores" and v < 1):
            raise ValueError("worker %s must be a %s integer, got %r" % (k, "positive" if k == "cores" else "non-negative", v))
    return {"cores": cores, "memory": memory, "disk": disk, "gpus": gpus}
