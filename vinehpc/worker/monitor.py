"""Measuring what a task uses, and enforcing the memory and disk it asked for.

A task's processes: everything in its process group (a command's session; a Python task's
interpreter, which also runs in its own session) plus the descendants of its first process
(which may have left the group).  The worker's loop samples running tasks every INTERVAL
seconds (never a task younger than MIN_AGE, so short tasks cost nothing but the final
measurement), and once more when a task ends:

  memory   peak of the sum of the processes' RSS, MB (with a command's rusage max RSS at exit;
           a Python task's interpreter reports its own peak RSS over the task)
  cores    cpu seconds / wall seconds (cpu of reaped children included: cutime/cstime, wait4)
  wall     seconds
  disk     bytes of the files under the sandbox, MB (symlinks -- the inputs -- not followed
           nor counted)
  read, written   bytes passed through read/write system calls (/proc/PID/io rchar/wchar)
  procs    the most processes seen at once

Monitoring never fails a task: a process that vanishes while being looked at is skipped.
"""
from __future__ import annotations

import os
import stat
import sys
import time

INTERVAL = 0.5      # seconds between samples of a running task
MIN_AGE = 0.2       # tasks younger than this are not sampled
MB = 1 << 20

_LINUX = sys.platform.startswith("linux") and os.path.isdir("/proc/self")
try:
    _TICK = os.sysconf("SC_CLK_TCK")
    _PAGE = os.sysconf("SC_PAGE_SIZE")
except (ValueError, OSError, AttributeError):   # pragma: no cover
    _TICK, _PAGE = 100, 4096


# ---------------------------------------------------------------- the process table
def proc_table() -> dict:
    """{pid: (ppid, pgid, cpu seconds incl. reaped children, rss bytes, starttime)} of every process."""
    if not _LINUX:
        return _proc_table_psutil()
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, "rb") as f:
                s = f.read()
        except OSError:
            continue
        try:
            f = s[s.rindex(b")") + 2:].split()    # after "pid (comm) "
            # f[0]=state f[1]=ppid f[2]=pgrp ... f[11..14]=utime,stime,cutime,cstime f[19]=starttime f[21]=rss
            cpu = (int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])) / _TICK
            out[int(name)] = (int(f[1]), int(f[2]), cpu, int(f[21]) * _PAGE, int(f[19]))
        except (ValueError, IndexError):
            continue
    return out


def _proc_table_psutil() -> dict:   # pragma: no cover - non-Linux
    import psutil
    out = {}
    for p in psutil.process_iter():
        try:
            with p.oneshot():
                t = p.cpu_times()
                cpu = t.user + t.system + getattr(t, "children_user", 0.0) + getattr(t, "children_system", 0.0)
                out[p.pid] = (p.ppid(), os.getpgid(p.pid), cpu, p.memory_info().rss, p.create_time())
        except (psutil.Error, OSError):
            continue
    return out


def _io(pid):
    """(chars read, chars written) by a process so far, or None."""
    if _LINUX:
        try:
            with open("/proc/%d/io" % pid, "rb") as f:
                d = dict(line.split(b":", 1) for line in f.read().splitlines() if b":" in line)
            return int(d[b"rchar"]), int(d[b"wchar"])
        except (OSError, KeyError, ValueError):
            return None
    try:    # pragma: no cover - non-Linux
        import psutil
        c = psutil.Process(pid).io_counters()
        return getattr(c, "read_chars", c.read_bytes), getattr(c, "write_chars", c.write_bytes)
    except Exception:
        return None


def tree_members(table: dict, root: int, pgid: int) -> list:
    """Pids of the task whose first process is `root` and whose process group is `pgid`."""
    members = {pid for pid, v in table.items() if v[1] == pgid}
    if root in table:
        members.add(root)
    kids = {}
    for pid, v in table.items():
        kids.setdefault(v[0], []).append(pid)
    todo = list(members)
    while todo:
        for c in kids.get(todo.pop(), ()):
            if c not in members:
                members.add(c)
                todo.append(c)
    return list(members)


def disk_usage(path) -> int:
    """Bytes of the files under `path`; symbolic links are neither followed nor counted."""
    total = 0
    todo = [path]
    while todo:
        d = todo.pop()
        try:
            it = os.scandir(d)
        except OSError:
            continue
        with it:
            for e in it:
                try:
                    if e.is_symlink():
                        continue
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    todo.append(e.path)
                elif stat.S_ISREG(st.st_mode):
                    total += st.st_size
    return total


# ---------------------------------------------------------------- one task
class Monitor:
    """What one task has used so far."""
    __slots__ = ("root", "pgid", "box", "mem", "cpu", "cpu0", "io", "io0", "procs", "disk",
                 "next_disk", "py")

    def __init__(self, box=None, py=False):
        self.box = box            # the sandbox's directory, if any
        self.py = py
        self.root = self.pgid = None
        self.mem = 0              # peak RSS sum, bytes
        self.cpu = 0.0            # cpu seconds (sampled, monotonic)
        self.cpu0 = None          # a Python interpreter's cpu when the task began (first sample)
        self.io = {}              # (pid, starttime) -> last (rchar, wchar) seen
        self.io0 = {}             # a Python interpreter's counters when first seen
        self.procs = 0
        self.disk = 0
        self.next_disk = 0.0

    def attach(self, pid):
        """The task's first process (its group leader)."""
        self.root = self.pgid = pid

    def sample(self, table, now, *, disk=True):
        """Look at the task's processes now (`table`: proc_table())."""
        if self.root is not None:
            try:
                members = tree_members(table, self.root, self.pgid)
                rss = cpu = 0.0
                for pid in members:
                    ppid, pg, c, r, st = table[pid]
                    rss += r
                    cpu += c
                    io = _io(pid)
                    if io is not None:
                        key = (pid, st)
                        if self.py and key not in self.io0:
                            self.io0[key] = io      # a long-lived interpreter: count from now
                        self.io[key] = io
                if self.py and self.cpu0 is None:
                    self.cpu0 = cpu
                if self.py:
                    cpu -= self.cpu0
                self.mem = max(self.mem, int(rss))
                self.cpu = max(self.cpu, cpu)
                self.procs = max(self.procs, len(members))
            except Exception:     # never let monitoring fail a task
                pass
        if disk and self.box is not None and now >= self.next_disk:
            t0 = time.perf_counter()
            try:
                self.disk = max(self.disk, disk_usage(self.box))
            except Exception:
                pass
            # a big sandbox is scanned less often: at most ~10% of the loop's time
            self.next_disk = now + max(INTERVAL, 10 * (time.perf_counter() - t0))

    def final(self, rusage=None, py=None):
        """At the task's end: a command's wait4 rusage, or what a Python interpreter reported
        (py: dict with cpu seconds, peak rss bytes, chars read/written over the task)."""
        if rusage is not None:
            self.cpu = max(self.cpu, rusage.ru_utime + rusage.ru_stime)
            self.mem = max(self.mem, rusage.ru_maxrss * 1024)    # KiB on Linux: the largest one process
            self.procs = max(self.procs, 1)
        if py:
            self.cpu = py.get("cpu", self.cpu)
            self.mem = max(self.mem, py.get("rss") or 0)
            self.procs = max(self.procs, 1)
            if py.get("read") is not None:
                self.io = {"py": (py["read"], py["written"])}
                self.io0 = {}
        if self.box is not None:
            try:
                self.disk = max(self.disk, disk_usage(self.box))
            except Exception:
                pass

    def over(self, res) -> dict | None:
        """{"resource", "used", "allocated"} for a requested memory or disk allocation exceeded."""
        for k, used in (("memory", self.mem), ("disk", self.disk)):
            a = res.get(k) or 0
            if a > 0 and used > a * MB:
                return {"resource": k, "used": -(-used // MB), "allocated": a}
        return None

    def measured(self, wall) -> dict:
        rd = wr = 0
        for key, (r, w) in self.io.items():
            r0, w0 = self.io0.get(key, (0, 0))
            rd += r - r0
            wr += w - w0
        return {"memory": round(self.mem / MB, 1), "cores": round(self.cpu / wall, 3) if wall > 0 else 0.0,
                "wall": round(wall, 6), "disk": round(self.disk / MB, 3), "read": max(0, rd), "written": max(0, wr),
                "procs": self.procs}

