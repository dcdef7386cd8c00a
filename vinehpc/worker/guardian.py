"""Kills a worker's task process groups if the worker itself dies (kill -9, OOM killer).

The worker writes "+PGID" when it starts a task's process group (or a Python interpreter)
and "-PGID" when it has reaped it, one per line, into our stdin.  When stdin reaches EOF
(the worker is gone, however it died) every group still listed gets SIGKILL, and so does
every process that carries the worker's token in its environment (argv[1]; the worker puts it
in its own environment, so all it starts inherits it): that also catches a task started in the
instant before its "+PGID" line was written, and processes that left their group.  A lost
worker never leaves tasks running unattended.  Stdlib only; started with python -I.
"""
import os
import signal
import sys


def main():
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    live = set()
    for line in sys.stdin.buffer:
        line = line.strip()
        if not line:
            continue
        try:
            pgid = int(line[1:])
        except ValueError:
            continue
        if line[:1] == b"+":
            live.add(pgid)
        else:
            live.discard(pgid)
    for pgid in live:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if len(sys.argv) > 1:
        token = ("VINEHPC_WORKER_TOKEN=%s" % sys.argv[1]).encode()
        for _ in range(3):        # again, for anything forked while we looked
            if not kill_marked(token):
                break


def kill_marked(token) -> int:
    me, n = os.getpid(), 0
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open("/proc/%s/environ" % name, "rb") as f:
                env = f.read()
        except OSError:
            continue
        if token in env.split(b"\0"):
            try:
                os.kill(int(name), signal.SIGKILL)
                n += 1
            except (ProcessLookupError, PermissionError):
                pass
    return n


if __name__ == "__main__":
    main()
