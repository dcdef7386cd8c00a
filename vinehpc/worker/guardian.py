"""Kills a worker's task process groups if the worker itself dies (kill -9, OOM killer).

The worker writes "+PGID" when it starts a task's process group (or a Python interpreter)
and "-PGID" when it has reaped it, one per line, into our stdin.  When stdin reaches EOF
(the worker is gone, however it died) every group still listed gets SIGKILL, so a lost
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


if __name__ == "__main__":
    main()
