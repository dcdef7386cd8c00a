"""Runs inside the new user+network namespace (started by ns.py through `unshare`), as root of the
user namespace: tells the parent the namespace exists, waits until slirp4netns has configured it,
applies the parent's plan (resolv.conf, firewall), then execs the command.

Run as a script (`python -I _nschild.py ...`): standard library only, nothing of vinehpc imported.
argv: PARENT_PID NS_READY_FD GO_FD STATUS_FD -- CMD...
The status fd is close-on-exec: EOF on it tells the parent that exec succeeded; otherwise it
carries one line saying what failed.
"""
import ctypes
import ctypes.util
import json
import os
import signal
import subprocess
import sys

MS_BIND = 4096
PR_SET_PDEATHSIG = 1


def fail(status_fd, msg, code):
    try:
        os.write(status_fd, (msg.replace("\n", " ") + "\n").encode())
    except OSError:
        pass
    os._exit(code)


def bind_mount(src, dst):
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.mount(src.encode(), dst.encode(), None, MS_BIND, None) != 0:
        e = ctypes.get_errno()
        raise OSError(e, "mount --bind %s %s: %s" % (src, dst, os.strerror(e)))


def run(argv, what, stdin_text=None):
    r = subprocess.run(argv, input=stdin_text, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        raise RuntimeError("%s failed (%s exited %d): %s" % (what, argv[0], r.returncode, r.stdout.strip()))


def main(argv):
    parent, ready_fd, go_fd, status_fd = (int(x) for x in argv[:4])
    cmd = argv[5:]
    try:   # like bwrap --die-with-parent: if `vinehpc net ns` is killed, the command goes too
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except Exception:
        pass
    if os.getppid() != parent:
        os._exit(1)
    os.write(ready_fd, b"1")
    os.close(ready_fd)
    data = b""
    while True:
        chunk = os.read(go_fd, 65536)
        if not chunk:
            break
        data += chunk
    os.close(go_fd)
    if not data:
        os._exit(1)   # the parent gave up (it reports why)
    plan = json.loads(data)
    try:
        run(["ip", "link", "set", "lo", "up"], "bringing up lo") if plan.get("lo_up") else None
        if plan.get("resolv_conf"):
            bind_mount(plan["resolv_conf"], "/etc/resolv.conf")
        for step in plan.get("steps", []):
            run(step["argv"], step["what"], step.get("stdin"))
    except Exception as e:
        fail(status_fd, "setting up the namespace: %s" % e, 125)
    os.set_inheritable(status_fd, False)
    try:
        os.execvp(cmd[0], cmd)
    except OSError as e:
        fail(status_fd, "cannot run %s: %s" % (cmd[0], e.strerror or e), 126 if e.errno == 13 else 127)


if __name__ == "__main__":
    main(sys.argv[1:])
