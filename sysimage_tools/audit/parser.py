"""strace text -> file operations with absolute paths. A pure function: no I/O, no clock.

Understands what ``strace -f -y`` (and plain ``strace``, ``-ff`` files, ``-t/-tt/-ttt/-r``, ``-T``)
print: pid prefixes (``1234  `` with -o, ``[pid 1234] `` on stderr); ``<unfinished ...>`` /
``<... NAME resumed>`` pairs interleaved across pids; quoted strings with C, octal and hex
escapes and truncation (``"..."...``); -y fd decorations (``3</path>``, ``AT_FDCWD</cwd>``,
-yy's nested ``<char 1:3>``); errors (``= -1 ENOENT (...)``); restarts (``= ? ERESTARTSYS``:
the call is counted once, when re-issued); ``+++ exited with N +++``, ``+++ killed by SIG +++``,
``--- SIGX {...} ---`` and strace's own ``strace: ...`` messages.

Relative paths are resolved against the calling process's cwd, tracked from chdir/fchdir/getcwd
and the -y decoration of AT_FDCWD; a child made by clone/fork/vfork starts with a copy of its
parent's cwd and fd table, or shares them (CLONE_FS, CLONE_FILES: threads). A child whose
first line comes before its parent's clone returns is matched to the pending clone. fds are
also followed without -y (open results, dup, fcntl F_DUPFD, close).

Counted operations are the syscalls of strace's ``%file`` class plus the fd-based directory
walkers (getdents, getdents64, fchdir); getcwd only informs the cwd. Anything else in a full
trace is ignored (and counted in ``Trace.ignored``).
"""
from __future__ import annotations

import posixpath
import re
import sys
from collections import Counter

from .syntax import fd_arg, result_of, split_args, string_arg

METADATA, OPEN, EXEC, MODIFY = "metadata", "open", "exec", "modify"
KINDS = (METADATA, OPEN, EXEC, MODIFY)
OK, UNKNOWN = "ok", "?"      # Op.result: OK, an errno name ("ENOENT"), or UNKNOWN (the process died in the call)

# name -> (kind, dirfd arg, path arg, (dirfd arg, path arg) of a second path or None).
# dirfd None: the path is relative to the cwd. path None: the operation is on the dirfd itself.
SYSCALLS: dict = {}


def _table(kind, names, dirfd, path, second=None):
    for n in names.split():
        SYSCALLS[n] = (kind, dirfd, path, second)


_table(OPEN, "open creat", None, 0)
_table(OPEN, "openat openat2", 0, 1)
_table(OPEN, "open_by_handle_at", 0, None)
_table(EXEC, "execve", None, 0)
_table(EXEC, "execveat", 0, 1)
_table(METADATA, "stat lstat stat64 lstat64 oldstat oldlstat access readlink statfs statfs64 chdir chroot "
                 "getxattr lgetxattr listxattr llistxattr uselib quotactl", None, 0)
_table(METADATA, "newfstatat fstatat64 statx faccessat faccessat2 readlinkat name_to_handle_at open_tree", 0, 1)
_table(METADATA, "fchdir getdents getdents64 readdir", 0, None)
_table(METADATA, "inotify_add_watch", None, 1)
_table(METADATA, "fanotify_mark", 3, 4)
_table(MODIFY, "mkdir rmdir unlink chmod chown chown32 lchown lchown32 truncate truncate64 utime utimes mknod "
               "setxattr lsetxattr removexattr lremovexattr acct swapon swapoff umount umount2 pivot_root", None, 0)
_table(MODIFY, "mkdirat unlinkat fchmodat fchmodat2 fchownat futimesat utimensat mknodat", 0, 1)
_table(MODIFY, "rename link", None, 0, (None, 1))
_table(MODIFY, "renameat renameat2 linkat", 0, 1, (2, 3))
_table(MODIFY, "symlink", None, 1)           # the link is created; the target is not looked up
_table(MODIFY, "symlinkat", 1, 2)
_table(MODIFY, "mount", None, 1)

_CLONES = frozenset(("clone", "clone2", "clone3", "fork", "vfork"))

_PREFIX = re.compile(r"\s*(?:\[pid\s+(\d+)\]\s*|(\d+)\s+)?(?:(?:\d+:\d+:\d+(?:\.\d+)?|\d+\.\d+)\s+)?")
_DURATION = re.compile(r"\s<\d+\.\d+>\s*$")
_CALL = re.compile(r"([A-Za-z_]\w*|\?\?\?)\(")
_RESUMED = re.compile(r"<\.\.\. ([A-Za-z_]\w*|\?\?\?) resumed>\s?")
_UNFINISHED = re.compile(r"\s*<(unfinished|detached|pid changed to \d+) \.\.\.>\s*$")
_UNFINISHED_ANY = re.compile(r"\s*<unfinished \.\.\.>")


class Op:
    """One file operation: who, which syscall, what kind, on which path, with which result.

    `path` is absolute and normalized when it could be resolved; a relative path (cwd
    unknown) or None (an fd whose path is unknown) otherwise. `result` is "ok", an errno
    name, or "?" when the process died before the call returned."""
    __slots__ = ("pid", "syscall", "kind", "path", "path2", "result")

    def __init__(self, pid, syscall, kind, path, path2, result):
        self.pid, self.syscall, self.kind, self.path, self.path2, self.result = pid, syscall, kind, path, path2, result

    def __repr__(self):
        return "Op(%s %s %s %r -> %s)" % (self.pid, self.syscall, self.kind, self.path, self.result)


class Trace:
    """What parse() returns: the operations and what was learned about the processes."""

    def __init__(self):
        self.ops: list = []
        self.processes: dict = {}       # pid -> {"parent", "exit_code", "signal", "exec"}
        self.root_pid = None            # the first pid of the trace (the traced command)
        self.lines = 0
        self.unparsed = 0               # lines that fit no known shape
        self.unparsed_examples: list = []
        self.restarted = 0              # ERESTART* returns (the call is counted when re-issued)
        self.died_in_call = 0           # unfinished calls whose process exited first (counted, result "?")
        self.truncated = 0              # paths strace printed truncated ("..."...)
        self.ignored: Counter = Counter()   # syscalls that are not file operations
        self.signals: Counter = Counter()   # --- SIGX --- lines

    @property
    def root(self) -> dict:
        return self.processes.get(self.root_pid, {})


class _Proc:
    __slots__ = ("pid", "cwd", "fds", "parent", "exit_code", "signal", "exe", "pending", "own_cwd", "gone")

    def __init__(self, pid, cwd, fds, parent):
        self.pid, self.cwd, self.fds, self.parent = pid, cwd, fds, parent
        self.exit_code = self.signal = self.exe = self.pending = None
        self.own_cwd = False            # learned its cwd itself (then a late parent link keeps it)
        self.gone = False               # exited: a later process with this pid is a new one


def parse(text, cwd: str = None) -> Trace:
    """Parse strace output (a string or an iterable of lines) into a Trace.

    `cwd` is the directory the traced command started in; without it, relative paths of calls
    that do not show their directory (-y's AT_FDCWD</cwd>) stay relative."""
    p = Parser(cwd)
    lines = text.splitlines() if isinstance(text, str) else text
    for line in lines:
        p.feed(line)
    return p.finish()


def _norm(path: str) -> str:
    p = posixpath.normpath(path)
    if p.startswith("//"):
        p = "/" + p.lstrip("/")
    return sys.intern(p)


def _clone_flags(args_text: str) -> tuple:
    return "CLONE_FS" in args_text, "CLONE_FILES" in args_text


class Parser:
    """Incremental form of parse(): feed(line) for each line, then finish()."""

    def __init__(self, cwd: str = None):
        self.trace = Trace()
        self.initial_cwd = _norm(cwd) if cwd else None
        self.procs: dict = {}
        self.pending_clones: list = []   # [pid, (share_fs, share_files)] of clones not yet returned
        self.retired: list = []          # processes whose pid was later reused

    # -------------------------------------------------------------- lines
    def feed(self, line: str) -> None:
        t = self.trace
        t.lines += 1
        line = line.rstrip("\n")
        m = _PREFIX.match(line)
        pid = int(m.group(1) or m.group(2) or 0)
        body = line[m.end():]
        if not body.strip():
            return
        if body.startswith("+++ "):
            return self._exit_line(pid, body)
        if body.startswith("--- "):
            sig = body[4:].split(" ", 1)[0]
            if sig.startswith("SIG"):
                t.signals[sig] += 1
            elif body.startswith("--- stopped by "):
                t.signals[body[15:].split(" ", 1)[0]] += 1
            else:
                self._bad(line)
            return
        if body.startswith("strace: ") or body.startswith("(strace: "):
            return                       # strace's own notes ("Process 12 attached", ...)
        body = _DURATION.sub("", body)
        proc = self._proc(pid)
        m = _RESUMED.match(body)
        if m:
            name, rest = m.group(1), body[m.end():]
            pend = proc.pending
            proc.pending = None
            if pend is None or pend[0] != name:
                if pend is not None:
                    self._flush(proc, pend)
                self._bad(line)          # a resumption without its start (trace began mid-call)
                return
            rest = _UNFINISHED_ANY.sub("", rest)   # "<... exit resumed> <unfinished ...>) = ?"
            return self._call(proc, name, pend[1] + rest, line)
        m = _CALL.match(body)
        if not m:
            return self._bad(line)
        name, rest = m.group(1), body[m.end():]
        u = _UNFINISHED.search(rest)
        if u:
            if proc.pending is not None:
                self._flush(proc, proc.pending)
            head = rest[:u.start()]
            proc.pending = (name, head if head.endswith(("(", ", ", ",")) else head + " ")
            if name in _CLONES:
                self.pending_clones.append([proc.pid, _clone_flags(head)])
            return
        self._call(proc, name, rest, line)

    def finish(self) -> Trace:
        t = self.trace
        for proc in self.procs.values():
            if proc.pending is not None:
                self._flush(proc, proc.pending)
                proc.pending = None
        seen = Counter()
        for proc in self.retired + list(self.procs.values()):
            seen[proc.pid] += 1                    # a reused pid: "1234", then "1234#2"
            key = proc.pid if seen[proc.pid] == 1 else "%d#%d" % (proc.pid, seen[proc.pid])
            t.processes[key] = {"parent": proc.parent, "exit_code": proc.exit_code, "signal": proc.signal,
                                "exec": proc.exe}
        return t

    def _bad(self, line):
        t = self.trace
        t.unparsed += 1
        if len(t.unparsed_examples) < 10:
            t.unparsed_examples.append(line[:300])

    def _exit_line(self, pid, body):
        proc = self._proc(pid)
        if proc.pending is not None:
            self._flush(proc, proc.pending)
            proc.pending = None
        proc.gone = not body.startswith("+++ superseded")
        m = re.match(r"\+\+\+ exited with (-?\d+) \+\+\+", body)
        if m:
            proc.exit_code = int(m.group(1))
            return
        m = re.match(r"\+\+\+ killed by (SIG\w+|\d+)( \(core dumped\))?", body)
        if m:
            proc.signal = m.group(1) + (" (core dumped)" if m.group(2) else "")
            return
        m = re.match(r"\+\+\+ superseded by execve in pid (\d+) \+\+\+", body)
        if m:                            # thread N exec'd and took over this (the leader's) pid:
            thread = self.procs.get(int(m.group(1)))    # its execve resumes here
            if thread is not None and thread is not proc:
                proc.pending, thread.pending = thread.pending, None
                thread.gone = True
            return
        self._bad(body)

    def _flush(self, proc, pend):
        """An unfinished call that never resumed: count it (it reached the kernel), result unknown."""
        name, head = pend
        if name in _CLONES:
            self._drop_pending_clone(proc.pid)
        if name in SYSCALLS:
            self.trace.died_in_call += 1
            self._call(proc, name, head.rstrip(", ") + ") = ?", None)

    # ------------------------------------------------------------ processes
    def _proc(self, pid) -> _Proc:
        proc = self.procs.get(pid)
        if proc is not None:
            if not proc.gone:
                return proc
            self._retire(proc)           # the pid was reused
        t = self.trace
        if t.root_pid is None:
            t.root_pid = pid
            proc = _Proc(pid, [self.initial_cwd], {}, None)
        elif self.pending_clones:
            ppid, flags = self.pending_clones[-1]
            proc = self._child(pid, self.procs[ppid], flags)
        else:                            # parent unknown (clone not traced): assume the command's cwd
            root = self.procs.get(t.root_pid)
            proc = _Proc(pid, [root.cwd[0] if root else self.initial_cwd], {}, None)
        self.procs[pid] = proc
        return proc

    def _retire(self, proc):
        self.retired.append(proc)
        del self.procs[proc.pid]

    @staticmethod
    def _child(pid, parent, flags):
        share_fs, share_files = flags
        return _Proc(pid, parent.cwd if share_fs else [parent.cwd[0]],
                     parent.fds if share_files else dict(parent.fds), parent.pid)

    def _drop_pending_clone(self, pid):
        for k in range(len(self.pending_clones) - 1, -1, -1):
            if self.pending_clones[k][0] == pid:
                return self.pending_clones.pop(k)[1]
        return None

    def _cloned(self, proc, args_text, ret):
        flags = self._drop_pending_clone(proc.pid) or _clone_flags(args_text)
        try:
            cpid = int(ret)
        except ValueError:
            return
        if cpid <= 0:
            return
        child = self.procs.get(cpid)
        if child is not None and child.gone:
            self._retire(child)
            child = None
        if child is None:
            self.procs[cpid] = self._child(cpid, proc, flags)
        elif child.parent != proc.pid and not child.own_cwd:    # seen before its clone returned
            linked = self._child(cpid, proc, flags)
            child.cwd, child.parent = linked.cwd, proc.pid

    # ----------------------------------------------------------------- calls
    def _call(self, proc, name, rest, line):
        t = self.trace
        args, end = split_args(rest)
        if end is None:
            return self._bad(line) if line is not None else None
        ret, deco, errno = result_of(rest, end)
        if ret is None:
            return self._bad(line) if line is not None else None
        if errno is not None and errno.startswith("ERESTART"):
            t.restarted += 1
            return
        result = errno if errno is not None else (UNKNOWN if ret == "?" else OK)
        if name in _CLONES:
            return self._cloned(proc, rest[:end], ret) if result == OK else None
        spec = SYSCALLS.get(name)
        if spec is None:
            return self._bookkeeping(proc, name, args, ret, deco, result)
        kind, dirfd_i, path_i, second = spec
        path = self._path(proc, args, dirfd_i, path_i)
        path2 = self._path(proc, args, *second) if second else None
        if result == OK:
            if name in ("chdir", "fchdir") and path is not None and path.startswith("/"):
                proc.cwd[0] = path
                proc.own_cwd = True
            elif kind == OPEN:
                try:
                    fd = int(ret)
                except ValueError:
                    fd = None
                if fd is not None and fd >= 0:
                    proc.fds[fd] = deco or path
            elif kind == EXEC:
                proc.exe = path
        t.ops.append(Op(proc.pid, name, kind, path, path2, result))

    def _path(self, proc, args, dirfd_i, path_i):
        """Resolve the path an argument pair names; teaches the cwd and fd table from -y decorations."""
        base = proc.cwd[0]
        if dirfd_i is not None:
            fa = fd_arg(args[dirfd_i]) if dirfd_i < len(args) else None
            if fa is None:
                base = None
            elif fa[0] == "AT_FDCWD":
                if fa[1] is not None:
                    base = proc.cwd[0] = fa[1]
                    proc.own_cwd = True
            else:
                if fa[1] is not None:
                    proc.fds[fa[0]] = fa[1]
                base = fa[1] or proc.fds.get(fa[0])
        path = None
        if path_i is not None and path_i < len(args):
            s = string_arg(args[path_i])
            if s is not None:
                path, truncated = s
                if truncated:
                    self.trace.truncated += 1
                    path += "..."
        if not path:                     # the fd itself: getdents64(3</d>), newfstatat(3</f>, "", AT_EMPTY_PATH)
            return _norm(base) if base else None
        if path.startswith("/"):
            return _norm(path)
        if base is None or not base.startswith("/"):
            return sys.intern(path)      # relative, directory unknown
        return _norm(base + "/" + path)

    def _bookkeeping(self, proc, name, args, ret, deco, result):
        if result == OK:
            if name == "getcwd":
                s = string_arg(args[0]) if args else None
                if s is not None and s[0].startswith("/"):
                    proc.cwd[0] = _norm(s[0])
                    proc.own_cwd = True
                return
            if name == "close" and args:
                fa = fd_arg(args[0])
                if fa is not None:
                    proc.fds.pop(fa[0], None)
            elif name in ("dup", "dup2", "dup3") or (name == "fcntl" and len(args) > 1 and "DUPFD" in args[1]):
                fa = fd_arg(args[0]) if args else None
                try:
                    new = int(ret)
                except ValueError:
                    new = None
                if fa is not None and new is not None:
                    src = fa[1] or proc.fds.get(fa[0])
                    if src:
                        proc.fds[new] = src
        self.trace.ignored[name] += 1
