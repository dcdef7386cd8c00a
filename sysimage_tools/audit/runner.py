"""Run a command under ``strace -f`` and say clearly why when that cannot be done.

Exit codes follow the shell and env(1)/timeout(1): 127 command not found, 126 found but not
executable, 125 the audit itself failed (no strace, no ptrace); otherwise the command's own.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

# %file: every syscall that takes a path; getdents*/fchdir: the fd-based directory walkers;
# clone & co: who is whose child (cwd and fd inheritance). Not traced: read/write/mmap/close.
TRACE_SET = "%file,getdents,getdents64,chdir,fchdir,clone,clone3,fork,vfork"
TRACE_SET_OLD = "file,getdents,getdents64,chdir,fchdir,clone,fork,vfork"    # strace < 5.2 / no clone3
NOT_FOUND, NOT_EXECUTABLE, AUDIT_FAILED = 127, 126, 125
INSTALL_HINT = ("apt-get install strace (Debian/Ubuntu), dnf install strace (RHEL/Fedora); on a cluster "
                "try `module load strace` or ask for it on compute nodes")


class AuditError(Exception):
    """Why the audit could not run; `exit_code` is what `vinehpc audit` exits with."""

    def __init__(self, message: str, exit_code: int = AUDIT_FAILED):
        super().__init__(message)
        self.exit_code = exit_code


class Run:
    """The outcome of one traced run."""

    def __init__(self, **kw):
        self.trace_path = kw["trace_path"]      # strace's output
        self.exit = kw["exit"]                  # {"code", "signal", "text"}
        self.wall_seconds = kw["wall_seconds"]
        self.cwd = kw["cwd"]
        self.strace = kw["strace"]              # {"path", "version", "argv", "seccomp_bpf"}
        self.interrupted = kw.get("interrupted", False)


def find_strace() -> str:
    path = shutil.which("strace")
    if not path:
        raise AuditError("strace is not installed (or not on PATH): " + INSTALL_HINT)
    return path


def resolve_command(cmd: list) -> str:
    """The executable CMD names, found as the shell would; AuditError(127/126) otherwise."""
    if not cmd:
        raise AuditError("no command given: vinehpc audit [options] -- CMD [ARGS...]", 2)
    name = cmd[0]
    if "/" in name:
        if not os.path.exists(name):
            raise AuditError("%s: no such file (exit 127: command not found); nothing was traced" % name, NOT_FOUND)
        path = name
    else:
        path = shutil.which(name)
        if path is None:
            if any(os.path.exists(os.path.join(d, name)) for d in os.environ.get("PATH", "").split(os.pathsep) if d):
                raise AuditError("%s: found on PATH but not executable (exit 126); nothing was traced" % name,
                                 NOT_EXECUTABLE)
            raise AuditError("%s: command not found on PATH (exit 127); nothing was traced" % name, NOT_FOUND)
    if os.path.isdir(path):
        raise AuditError("%s: is a directory (exit 126); nothing was traced" % name, NOT_EXECUTABLE)
    if not os.access(path, os.X_OK):
        raise AuditError("%s: permission denied: not executable (exit 126); nothing was traced" % name,
                         NOT_EXECUTABLE)
    return path


def strace_argv(strace: str, out: str, cmd: list, *, seccomp: bool = True, trace_set: str = TRACE_SET) -> list:
    argv = [strace, "-f", "-y", "-qq", "-s", "4096"]
    if seccomp:
        argv.append("--seccomp-bpf")     # only the traced syscalls stop the tracee: much less overhead
    return argv + ["-e", "trace=" + trace_set, "-o", out, "--"] + list(cmd)


def probe(strace: str, seccomp: bool = True) -> dict:
    """Check that strace can trace here, with which options -> {"seccomp_bpf", "trace_set", "version"}."""
    true = shutil.which("true") or sys.executable
    targs = [] if true != sys.executable else ["-c", "pass"]
    attempts = [(seccomp, TRACE_SET), (False, TRACE_SET), (False, TRACE_SET_OLD)] if seccomp else \
        [(False, TRACE_SET), (False, TRACE_SET_OLD)]
    err = denied = ""
    for sec, tset in attempts:
        try:
            r = subprocess.run(strace_argv(strace, os.devnull, [true] + targs, seccomp=sec, trace_set=tset),
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, errors="replace", timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise AuditError("cannot run %s: %s" % (strace, e))
        err = r.stderr.strip()
        if r.returncode == 0 and not (sec and "seccomp" in err.lower()):
            return {"seccomp_bpf": sec, "trace_set": tset, "version": _version(strace)}
        if _ptrace_denied(err):
            denied = denied or err       # retried without --seccomp-bpf: it can be the one refused
    if denied:
        raise AuditError(ptrace_message(denied))
    raise AuditError("strace does not work here: %s" % (err or "exit status %d" % r.returncode))


def _ptrace_denied(err: str) -> bool:
    e = err.lower()
    return "operation not permitted" in e or "eperm" in e or ("ptrace" in e and "permission denied" in e)


def ptrace_message(detail: str) -> str:
    lines = ["ptrace is not permitted here, so strace cannot trace the command.",
             "  strace said: " + (detail.splitlines()[0] if detail else "(nothing)")]
    tracer = _status_field("TracerPid")
    if tracer and tracer != "0":
        lines.append("  this process is itself being traced (TracerPid %s: a debugger or another strace); "
                     "a process can have only one tracer" % tracer)
    scope = _read("/proc/sys/kernel/yama/ptrace_scope")
    if scope is not None:
        meaning = {"0": "classic: any process of the same user", "1": "restricted: only descendants (strace's own "
                   "child is one, so something else blocks it)", "2": "admin only: needs CAP_SYS_PTRACE",
                   "3": "no ptrace at all until reboot"}.get(scope, "?")
        lines.append("  kernel.yama.ptrace_scope = %s (%s); an admin can change it: sysctl kernel.yama.ptrace_scope=1"
                     % (scope, meaning))
    lines.append("  in a container, ptrace needs the SYS_PTRACE capability: docker/podman run --cap-add SYS_PTRACE "
                 "(older Docker also --security-opt seccomp=unconfined); Kubernetes: securityContext.capabilities"
                 ".add: [SYS_PTRACE]")
    lines.append("  on a cluster, some sites forbid ptrace on login nodes: try a compute node (srun --pty ...), "
                 "or record the trace where it is allowed and analyze it with --from-trace FILE")
    return "\n".join(lines)


def _read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _status_field(name):
    text = _read("/proc/self/status") or ""
    for line in text.splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    return None


def _version(strace: str):
    try:
        out = subprocess.run([strace, "-V"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    first = out.splitlines()[0] if out else ""
    return first.rsplit(" ", 1)[-1] if first else None


def exit_info(returncode: int) -> dict:
    """A subprocess return code -> {"code", "signal", "text"}; a signal death exits 128+N like a shell."""
    if returncode >= 0:
        return {"code": returncode, "signal": None, "text": "exited with %d" % returncode}
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = "signal %d" % -returncode
    return {"code": 128 - returncode, "signal": name, "text": "killed by %s (exit %d)" % (name, 128 - returncode)}


def run(cmd: list, *, raw: str = None, seccomp: bool = True) -> Run:
    """Run `cmd` under strace (stdin/stdout/stderr are the command's) and return where the trace is."""
    strace = find_strace()
    resolve_command(cmd)
    opts = probe(strace, seccomp)
    if raw:
        d = os.path.dirname(os.path.abspath(raw))
        if not os.path.isdir(d):
            raise AuditError("--raw %s: no such directory: %s" % (raw, d))
        out = raw
    else:
        fd, out = tempfile.mkstemp(prefix="vinehpc-audit-", suffix=".strace")
        os.close(fd)
    argv = strace_argv(strace, out, cmd, seccomp=opts["seccomp_bpf"], trace_set=opts["trace_set"])
    cwd = os.getcwd()
    interrupted = False
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(argv)
    except OSError as e:
        raise AuditError("cannot run %s: %s" % (strace, e))
    while True:
        try:
            rc = proc.wait() if not interrupted else proc.wait(timeout=10)
            break
        except KeyboardInterrupt:        # the command got the Ctrl-C too; report what it did until then
            interrupted = True
        except subprocess.TimeoutExpired:
            proc.kill()
    wall = time.monotonic() - t0
    ex = exit_info(rc)
    if interrupted:
        ex = {"code": 130, "signal": "SIGINT", "text": "interrupted (Ctrl-C): " + ex["text"]}
    return Run(trace_path=out, exit=ex, wall_seconds=round(wall, 4), cwd=cwd, interrupted=interrupted,
               strace={"path": strace, "version": opts["version"], "argv": argv[:argv.index("--")],
                       "seccomp_bpf": opts["seccomp_bpf"]})
