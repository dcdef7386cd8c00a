"""Kills a worker's task process groups if the worker itself dies (kill -9, OOM killer).

The worker writes "+PGID" lines into our stdin for the process groups it starts (tasks,
Python interpreters).  When stdin reaches EOF (the worker is gone, however it died) we kill
every process that carries the worker's token in its environment (argv[1]; the worker puts it
in its own environment, so everything it starts inherits it), and every listed group whose
leader still carries it (a group id is only trusted while its leader is ours: pids get
reused).  The token also catches a task started in the instant before its line was written.  A lost
worker never leaves tasks running unattended.  Then the worker's directory (argv[2], if given) is
removed once nobody holds its claim (workdir.py): a worker killed with -9 leaves nothing in
/dev/shm.  A worker that exits normally says "=" first and removes its directory itself.
Stdlib only; started with python -I.
"""
import os
import signal
import sys


def main():
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    groups = set()
    clean = False
    for line in sys.stdin.buffer:
        if line[:1] == b"+":
            try:
                groups.add(int(line[1:]))
            except ValueError:
                pass
        elif line[:1] == b"=":
            clean = True
    token = ("VINEHPC_WORKER_TOKEN=%s" % sys.argv[1]).encode() if len(sys.argv) > 1 else None
    if token is None:
        return
    for pgid in groups:
        if carries(pgid, token):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    for _ in range(3):        # again, for anything forked while we looked
        if not kill_marked(token):
            break
    if len(sys.argv) > 2 and not clean:
        remove_workdir(sys.argv[2])


def remove_workdir(path):
    """The dead worker's directory, once its claim is free (the kernel drops the lock as the
    worker's files are closed, maybe a moment after our stdin saw EOF)."""
    import time
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from vinehpc.worker.workdir import OWNER, remove_if_abandoned   # only now: a normal exit never needs it
    for _ in range(50):
        if not os.path.exists(os.path.join(path, OWNER)) or remove_if_abandoned(path):
            return        # never claimed (a --workdir given): not ours to remove; or done
        time.sleep(0.1)


def carries(pid, token) -> bool:
    try:
        with open("/proc/%d/environ" % pid, "rb") as f:
            return token in f.read().split(b"\0")
    except OSError:
        return False


def kill_marked(token) -> int:
    me, n = os.getpid(), 0
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != me and carries(int(name), token):
            try:
                os.kill(int(name), signal.SIGKILL)
                n += 1
            except (ProcessLookupError, PermissionError):
                pass
    return n


if __name__ == "__main__":
    main()
