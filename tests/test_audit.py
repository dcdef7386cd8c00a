"""`vinehpc audit`: the strace parser on recorded traces (every line shape), the report (mounts,
shared filesystems, causes, --ranks projection, --compare), and real strace runs on real programs.

Fixtures in tests/data/strace/:
  basic_f_y.strace            -f -y: pid prefixes, AT_FDCWD</cwd>, fd decorations, results, +++/--- lines
  interleaved.strace          <unfinished ...>/<... resumed> across threads (CLONE_FS), vfork child seen
                              before its parent's call returns, a process dying inside a call
  escapes.strace              no pid prefix; octal/hex/C escapes, quotes, truncation, -yy, (deleted)
  cwd_without_y.strace        no -y: cwd and fd tracking through chdir, fchdir, dup2, close, fork, threads
  errors_prefixes.strace      [pid N] prefixes, -tt timestamps, -T durations, ERESTARTSYS, signals, junk
  julia_depot_walk.strace     a Julia start walking its load path and depots (12 packages)
  real_threads_vfork_strace61.strace   recorded with strace 6.1: Python threads and os.system
  thread_execve_strace61.strace        recorded: a thread's execve (<pid changed to ...>, superseded)
  mountinfo_cluster.txt       a compute node's mount table (nfs4, lustre, cvmfs, gpfs, beegfs, ...)
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from sysimage_tools.audit import parse, render, report
from sysimage_tools.audit.mounts import MountTable, classify, parse_mountinfo
from sysimage_tools.audit.syntax import split_args, string_arg, unescape

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data", "strace")
PY = sys.executable                      # the real interpreter, not a pyenv shim (a bash script)


def fixture(name) -> str:
    with open(os.path.join(DATA, name), encoding="utf-8", errors="surrogateescape") as f:
        return f.read()


def cluster_table(shared=()):
    return MountTable(parse_mountinfo(fixture("mountinfo_cluster.txt")), shared)


def ops_of(trace, pid=None):
    return [(o.syscall, o.path, o.result) for o in trace.ops if pid is None or o.pid == pid]


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes", "on")


def require(condition, reason: str) -> None:
    """Skip unless `condition` -- but fail in CI (CI=true), where strace is installed by tests/run.sh."""
    if condition:
        return
    if in_ci():
        pytest.fail("required in CI (CI=%s), but: %s" % (os.environ.get("CI"), reason), pytrace=False)
    pytest.skip(reason)


# ============================================================== parser: line shapes
def test_f_y_trace_pids_decorations_results_and_exits():
    t = parse(fixture("basic_f_y.strace"), cwd="/elsewhere")
    assert t.unparsed == 0 and t.root_pid == 4001
    assert ops_of(t, 4001) == [
        ("execve", "/usr/bin/python3", "ok"),
        ("access", "/etc/ld.so.preload", "ENOENT"),
        ("openat", "/etc/ld.so.cache", "ok"),
        ("newfstatat", "/etc/ld.so.cache", "ok"),              # "" + AT_EMPTY_PATH: the fd's path
        ("openat", "/lib/x86_64-linux-gnu/libc.so.6", "ok"),   # the path asked for, not where it led
        ("readlink", "/proc/self/exe", "ok"),                  # the 2nd string is the result buffer
        ("newfstatat", "/home/u/proj/run.py", "ok"),           # relative to AT_FDCWD</home/u/proj>
        ("openat", "/home/u/proj/run.py", "ok"),
        ("statx", "/home/u/proj/data/input.txt", "ok"),
        ("openat", "/home/u/proj/data", "ok"),
        ("getdents64", "/home/u/proj/data", "ok"),             # fd-based, resolved by -y
        ("getdents64", "/home/u/proj/data", "ok"),
        ("faccessat2", "/home/u/proj/out", "ENOENT"),
        ("mkdir", "/home/u/proj/out", "ok"),                   # no dirfd: the cwd learned from -y/getcwd
        ("openat", "/home/u/proj/out/result.txt", "ok"),
        ("rename", "/home/u/proj/out/result.txt", "ok"),
        ("unlink", "/home/u/proj/out/tmp", "ENOENT"),
        ("openat", "/nonexistent/x", "ENOENT"),
    ]
    ren = [o for o in t.ops if o.syscall == "rename"][0]
    assert ren.path2 == "/home/u/proj/out/final.txt" and ren.kind == "modify"
    # the child (clone = 4002) inherits the cwd; its PATH search fails once, then exec works
    assert ops_of(t, 4002) == [("execve", "/usr/local/bin/tool", "ENOENT"), ("execve", "/usr/bin/tool", "ok"),
                               ("lstat", "/home/u/proj/out", "ok")]
    assert t.processes[4002] == {"parent": 4001, "exit_code": 2, "signal": None, "exec": "/usr/bin/tool"}
    assert t.root == {"parent": None, "exit_code": 0, "signal": None, "exec": "/usr/bin/python3"}
    assert t.signals == {"SIGCHLD": 1}
    kinds = {o.syscall: o.kind for o in t.ops}
    assert kinds["newfstatat"] == kinds["getdents64"] == kinds["access"] == "metadata"
    assert kinds["openat"] == "open" and kinds["execve"] == "exec" and kinds["mkdir"] == "modify"


def test_unfinished_resumed_interleaved_threads_vfork_and_death_in_a_call():
    t = parse(fixture("interleaved.strace"), cwd="/home/start")
    assert t.unparsed == 0
    assert ops_of(t) == [
        ("openat", "/work/a.py", "ok"),
        ("newfstatat", "/home/start/t1.txt", "ENOENT"),        # thread 5001 runs before clone3 returns
        ("newfstatat", "/work/a.py", "ok"),                    # resumed pairs, interleaved across pids
        ("newfstatat", "/work/b.py", "ENOENT"),
        ("chdir", "/home/start/sub", "ok"),
        ("access", "/work/c.py", "ok"),
        ("newfstatat", "/home/start/sub/y.txt", "ENOENT"),     # CLONE_FS: the thread's chdir moved us too
        ("execve", "/bin/ls", "ok"),                           # vfork child, seen before vfork returned
        ("openat", "/home/start/sub", "ok"),                   # ... with a copy of the parent's cwd
        ("getdents64", "/home/start/sub", "ok"),               # plain fd 3 of the child's own table
        ("getdents64", "/home/start/sub", "ok"),
        ("getdents64", "/work/a.py", "ok"),                    # the parent's fd 3 is untouched
        ("newfstatat", "/work/slow", "?"),                     # "<... resumed> <unfinished ...>) = ?"
        ("openat", "/work/never", "?"),                        # unfinished, then killed: counted
    ]
    assert t.processes[5001]["parent"] == 5000 and t.processes[5002]["parent"] == 5000
    assert t.processes[5003]["signal"] == "SIGKILL"
    assert t.died_in_call == 1
    assert t.ignored["exit_group"] == 1


def test_quoted_escaped_truncated_paths_and_decorations():
    t = parse(fixture("escapes.strace"), cwd="/data")          # no pid prefix at all (strace without -f)
    assert t.unparsed == 0 and t.root_pid == 0 and t.root["exit_code"] == 1
    paths = [o.path for o in t.ops]
    assert paths == [
        "/bin/sh",
        "/data/caf\u00e9/x",                      # octal UTF-8 bytes
        '/data/quote"d/back\\slash',              # \" and \\
        "/data/new\nline\ttab",                   # \n \t
        "/data/ABC",                              # \x41\x42 (strace -x)
        "/data/we<i>rd, dir/f",                   # -y decoration with \74 \76, a comma, and " (deleted)"
        "/data/very/long/path/that/was/cut...",   # "..."... : truncated by strace
        "/dev/pts/0",                             # -yy: 1</dev/pts/0<char 136:0>>
        "/data/comma, paren) and = sign",         # separators inside a string
        None,                                     # getdents64 on a socket: no path
        "/data/\udcffbad",                        # an undecodable byte, kept like os.fsdecode
        "/data/f",                                # rel\dir/..//./f normalized
    ]
    assert t.truncated == 1
    assert [o.result for o in t.ops][6] == "ENAMETOOLONG"


def test_cwd_and_fd_tracking_without_y():
    t = parse(fixture("cwd_without_y.strace"), cwd="/home/start")
    assert t.unparsed == 0
    got = [(o.pid, o.syscall, o.path, o.result) for o in t.ops]
    assert got == [
        (6000, "chdir", "/srv/app", "ok"),
        (6000, "openat", "/srv/app/conf", "ok"),
        (6000, "getdents64", "/srv/app/conf", "ok"),           # fd 7 = dup2(3); fd 3 then closed
        (6000, "newfstatat", "x", "EBADF"),                    # closed fd: the path stays relative
        (6001, "chdir", "/srv/app/sub", "ok"),                 # forked child: its own cwd
        (6001, "stat", "/srv/app/sub/file", "ok"),
        (6000, "access", "/srv/app/file", "ENOENT"),           # the parent's cwd did not move
        (6002, "chdir", "/srv", "ok"),                         # a thread (CLONE_FS) ...
        (6000, "readlinkat", "/srv/link", "EINVAL"),           # ... moves its process
        (6002, "openat", "/srv/shared.txt", "ok"),
        (6000, "getdents64", "/srv/shared.txt", "ENOTDIR"),    # CLONE_FILES: fd 9 is shared too
        (6000, "fchdir", "/srv/app/conf", "ok"),
        (6000, "statfs", "/srv/app/conf", "ok"),
        (6004, "mkdirat", "/srv/app/sub/made", "ok"),          # fork() of the child inherits its cwd
        (6004, "symlinkat", "/srv/app/sub/lnk", "ok"),         # the link, not its target
        (6004, "renameat2", "/srv/app/sub/made", "ok"),
        (6003, "openat", "/srv/app/conf/orphan.txt", "ENOENT"),    # parent unknown: the command's cwd
    ]
    assert [o.path2 for o in t.ops if o.syscall == "renameat2"] == ["/srv/moved"]
    assert t.processes[6004]["parent"] == 6001 and t.processes[6003]["parent"] is None
    assert t.ignored == {"dup2": 1, "close": 1}


def test_bracket_pids_timestamps_durations_restarts_signals_and_junk():
    t = parse(fixture("errors_prefixes.strace"))
    assert ops_of(t) == [
        ("openat", "/etc/hosts", "ok"),                        # [pid N] + -tt timestamp + -T duration
        ("newfstatat", "/etc/missing", "ENOENT"),
        ("openat", "/etc/shadow", "EACCES"),
        ("openat", "/slow/fifo", "ok"),                        # ERESTARTSYS: counted once, when re-issued
        ("stat", "/loop", "ELOOP"),
        ("openat", "/var/cache/x", "ENOENT"),
        ("access", "/x", "?"),                                 # = ? <unavailable>
        ("openat", "/odd", "ERRNO_528"),
    ]
    assert t.restarted == 1
    assert t.ignored == {"read": 1}                            # a full trace's other syscalls: ignored
    assert t.signals == {"SIGALRM": 1, "SIGSEGV": 1, "SIGSTOP": 1}
    assert t.processes[7001]["signal"] == "SIGSEGV (core dumped)"
    assert t.processes[7000]["exit_code"] == 139
    assert t.unparsed == 2                                     # a resumption without its start, and junk
    assert "this is not strace output" in t.unparsed_examples[1]


def test_other_prefix_styles_and_full_traces():
    text = "\n".join([
        '1700000000.123456 openat(AT_FDCWD, "/a", O_RDONLY) = 3',                  # -ttt, no pid
        '     0.000123 newfstatat(AT_FDCWD, "/b", 0x7ffe, 0) = -1 ENOENT (No such file or directory)',   # -r
        '12:00:01 write(1, "/not/a/path/but/a/string", 24) = 24',                 # -t; write is no file op
        'mmap(NULL, 8192, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0) = 0x7f1b2c3d4000',
        'open("rel", O_RDONLY) = 4',
        'getdents(4, 0x55, 32768) = 0',
        'creat("/c", 0644) = 5',
        'openat2(AT_FDCWD, "/d", {flags=O_RDONLY, resolve=RESOLVE_NO_SYMLINKS}, 24) = 6',
        'execveat(AT_FDCWD, "/bin/true", ["true"], 0x7ffe /* 1 var */, 0) = 0',
        'stat64("/e", 0xffb2c3d4) = 0',
        'fstatat64(AT_FDCWD, "/f", 0xffb2c3d4, 0) = 0',
        'lstat("/g", 0x7ffe) = -1 ENOENT (No such file or directory)',
        'faccessat(AT_FDCWD, "/h", X_OK) = 0',
        'unlinkat(AT_FDCWD, "/i", AT_REMOVEDIR) = 0',
        'chdir("/w") = 0',
        'utimensat(4, NULL, [UTIME_NOW, UTIME_NOW], 0) = 0',
        'exit_group(0) = ?',
        '+++ exited with 0 +++',
    ])
    t = parse(text, cwd="/start")
    assert t.unparsed == 0
    assert ops_of(t) == [
        ("openat", "/a", "ok"), ("newfstatat", "/b", "ENOENT"), ("open", "/start/rel", "ok"),
        ("getdents", "/start/rel", "ok"), ("creat", "/c", "ok"), ("openat2", "/d", "ok"),
        ("execveat", "/bin/true", "ok"), ("stat64", "/e", "ok"), ("fstatat64", "/f", "ok"),
        ("lstat", "/g", "ENOENT"), ("faccessat", "/h", "ok"), ("unlinkat", "/i", "ok"),
        ("chdir", "/w", "ok"), ("utimensat", "/start/rel", "ok"),   # NULL path: the fd itself
    ]
    assert t.ignored == {"write": 1, "mmap": 1, "exit_group": 1}


def test_recorded_strace61_trace_threads_and_os_system():
    """Recorded with strace 6.1 (-f -y -qq --seccomp-bpf): 4 Python threads stat a file and a missing
    name 50 times each (interleaved <unfinished>/<resumed>), then os.system runs sh -> ls, stat."""
    t = parse(fixture("real_threads_vfork_strace61.strace"), cwd="/nowhere")
    assert t.unparsed == 0 and t.died_in_call == 0
    misses = [o for o in t.ops if o.path and "/nope" in o.path]
    assert len(misses) == 200 and {o.result for o in misses} == {"ENOENT"}
    assert {o.path for o in misses} == {"/tmp/wd/nope%d" % i for i in range(4)}
    assert sum(o.path == "/tmp/wd/t.py" for o in t.ops) == 201
    threads = [p for p, info in t.processes.items() if info["parent"] == 5086 and not info["exec"]]
    assert len(threads) == 4
    assert t.processes[5101]["exec"] == "/bin/sh"
    assert t.processes[5102] == {"parent": 5101, "exit_code": None, "signal": None, "exec": "/usr/bin/ls"}
    assert ("getdents64", "/tmp/wd", "ok") in ops_of(t, 5102)                 # `ls` in the inherited cwd
    assert ("statx", "/tmp/wd", "ok") in ops_of(t, 5103)                      # after `cd /tmp`: stat wd
    assert ("chdir", "/tmp/wd/we<i>rd dir", "ok") in ops_of(t, 5086)


def test_thread_execve_pid_change_and_pid_reuse():
    """Recorded (strace 6.1): a thread's execve shows "<pid changed to LEADER ...>", the leader gets
    "+++ superseded by execve in pid THREAD +++" and then the execve resumes under the leader."""
    t = parse(fixture("thread_execve_strace61.strace"), cwd="/tmp")
    assert t.unparsed == 0 and t.died_in_call == 0
    assert [(o.pid, o.path, o.result) for o in t.ops if o.kind == "exec"] == [
        (16923, "/root/.pyenv/versions/3.11.7/bin/python", "ok"), (16923, "/bin/true", "ok")]
    assert t.root["exec"] == "/bin/true" and t.root["exit_code"] == 0
    # a pid used again after its process exited is a new process (cwd from its new parent)
    t = parse("\n".join([
        '100  chdir("/a") = 0',
        '100  clone(child_stack=NULL, flags=CLONE_CHILD_CLEARTID|CLONE_CHILD_SETTID|SIGCHLD) = 101',
        '101  chdir("/b") = 0',
        '101  +++ exited with 0 +++',
        '100  vfork() = 101',
        '101  open("x", O_RDONLY) = -1 ENOENT (No such file or directory)',
        '101  +++ exited with 7 +++',
    ]), cwd="/")
    assert [o.path for o in t.ops] == ["/a", "/b", "/a/x"]
    assert t.processes[101]["exit_code"] == 0 and t.processes["101#2"]["exit_code"] == 7


def test_parse_is_a_pure_function_of_the_text():
    text = fixture("interleaved.strace")
    a, b = parse(text, cwd="/c"), parse(text.splitlines(keepends=True), cwd="/c")
    assert ops_of(a) == ops_of(b) and a.processes == b.processes
    assert [o.path for o in parse(text, cwd="/other").ops][1] == "/other/t1.txt"


def test_low_level_helpers():
    assert unescape(r"a\"b\\c\n\t\0\33\x41\303\251") == 'a"b\\c\n\t\x00\x1bA\u00e9'
    assert string_arg('"abc"...') == ("abc", True)
    assert string_arg('"a...b"') == ("a...b", False)
    assert string_arg("NULL") is None and string_arg("0x7ffe") is None
    args, end = split_args('AT_FDCWD</a, b>, "x, (y)", {st_mode=S_IFREG, ...}, [1, 2] /* c, d */) = 0')
    assert args == ["AT_FDCWD</a, b>", '"x, (y)"', "{st_mode=S_IFREG, ...}", "[1, 2] /* c, d */"]
    assert split_args("")[1] is None and split_args(") = 0") == ([], 1)


# ============================================================== mounts and the report
def test_mountinfo_types_shadowing_and_longest_prefix():
    tab = cluster_table()
    look = lambda p: (tab.lookup(p).mountpoint, tab.lookup(p).fstype, tab.lookup(p).shared)  # noqa: E731
    assert look("/home/u/proj/x") == ("/home", "nfs4", True)
    assert look("/home") == ("/home", "nfs4", True)
    assert look("/homework/x") == ("/", "ext4", False)                    # components, not characters
    assert look("/home/u/.julia/scratchspaces/a") == ("/home/u/.julia/scratchspaces", "tmpfs", False)
    assert look("/lustre/scratch/u/f") == ("/lustre/scratch", "lustre", True)
    assert look("/cvmfs/sft.cern.ch/lcg/x") == ("/cvmfs/sft.cern.ch", "fuse", True)
    assert look("/gpfs/projects/p") == ("/gpfs/projects", "gpfs", True)
    assert look("/beegfs/x") == ("/beegfs", "beegfs", True)
    assert look("/mnt/remote/x") == ("/mnt/remote", "fuse.sshfs", True)
    assert look("/proc/cpuinfo") == ("/proc/cpuinfo", "fuse.lxcfs", False)  # container plumbing: local
    assert look("/mnt/my disk/f") == ("/mnt/my disk", "xfs", False)        # \040 in mountinfo
    assert look("/data/f") == ("/data", "nfs", True)                       # the later mount hides the first
    assert look("/tmp/x") == ("/tmp", "tmpfs", False)
    assert "CernVM-FS" in tab.lookup("/cvmfs/sft.cern.ch").why
    for fs in ("nfs", "nfs4", "lustre", "gpfs", "beegfs", "ceph", "cvmfs", "panfs", "fuse.gcsfuse"):
        assert classify(fs), fs
    for fs in ("ext4", "xfs", "tmpfs", "overlay", "proc", "fuse.lxcfs", "squashfs", "btrfs"):
        assert classify(fs) is None, fs


def test_shared_prefix_marks_a_tree(tmp_path):
    tab = cluster_table(shared=[str(tmp_path / "site")])
    m = tab.lookup(str(tmp_path / "site" / "env" / "lib.so"))
    assert m.shared and m.mountpoint == str(tmp_path / "site") and "--shared" in m.why
    assert "underneath" in m.why
    assert not tab.lookup(str(tmp_path / "other")).shared


def test_report_totals_mounts_top_and_causes_julia_walk():
    rep = report.build(parse(fixture("julia_depot_walk.strace")), cluster_table(), top=5)
    t = rep["totals"]
    assert t["ops"] == t["metadata"] + t["opens"] + t["exec"] + t["modify"] == 395
    assert t["ok"] + t["ENOENT"] + t["errors"] + t["unknown"] == t["ops"]
    assert t["ENOENT"] == 175 and rep["errors"] == {"ENOENT": 175}
    assert sum(s["ops"] for s in rep["syscalls"]) == t["ops"]
    assert rep["syscalls"][0]["syscall"] == "newfstatat"
    mounts = {m["mountpoint"]: m for m in rep["mounts"]}
    assert mounts["/home"]["shared"] and mounts["/home"]["fstype"] == "nfs4"
    assert mounts["/home"]["metadata"] == 194 and mounts["/home"]["opens"] == 73
    assert mounts["/lustre/scratch"]["shared"] and not mounts["/opt/julia"]["shared"]
    assert rep["shared"]["ops"] == mounts["/home"]["ops"] + mounts["/lustre/scratch"]["ops"] == 303
    assert rep["shared"]["mounts"] == ["/home", "/lustre/scratch"]
    assert len(rep["top_paths"]) == 5 and rep["top_paths"][0]["ops"] == 36
    assert rep["top_dirs"][0]["dir"] == "/home/u/proj"
    causes = rep["causes"]
    assert causes["scope"] == "on shared filesystems"
    kinds = [c["kind"] for c in causes["items"]]
    assert "repeated" in kinds and "search" in kinds
    rep_paths = [p["path"] for c in causes["items"] if c["kind"] == "repeated" for p in c["paths"]]
    assert {"/home/u/proj/Project.toml", "/home/u/proj/JuliaProject.toml"} <= set(rep_paths[:2])
    search = [c for c in causes["items"] if c["kind"] == "search"]
    assert [c["search"] for c in search] == ["julia"]          # libjulia's hwcaps walk is on local disk
    assert search[0]["examples"][0]["name"] == "JuliaProject.toml"
    assert json.loads(json.dumps(rep)) == rep                   # JSON-able as it is


def test_search_detection_names_libraries_python_and_path():
    lines = []
    for d in ["/nfs/a", "/nfs/b", "/nfs/c", "/nfs/d"]:
        lines.append('1  openat(AT_FDCWD, "%s/libblas.so.3", O_RDONLY) = -1 ENOENT (No such file or directory)' % d)
        lines.append('1  newfstatat(AT_FDCWD, "%s/site-packages/mod.py", 0x1, 0) = -1 ENOENT (No such file '
                     'or directory)' % d)
        lines.append('1  execve("%s/bin/tool", ["tool"], 0x1 /* 1 var */) = -1 ENOENT (No such file or '
                     'directory)' % d)
    lines.append('1  openat(AT_FDCWD, "/nfs/lib/libblas.so.3", O_RDONLY) = 3')
    rep = report.build(parse("\n".join(lines)), MountTable(parse_mountinfo(
        "1 0 0:1 / / rw - ext4 /dev/sda rw\n2 1 0:2 / /nfs rw - nfs4 srv:/ rw\n")))
    search = {c["search"]: c for c in rep["causes"]["items"] if c["kind"] == "search"}
    assert set(search) == {"library", "python", "exec"}
    assert search["library"]["examples"][0] == {"name": "libblas.so.3", "directories": 4, "enoent": 4,
                                                "found_in": "/nfs/lib"}
    assert "LD_LIBRARY_PATH" in search["library"]["text"] and "found in /nfs/lib" in search["library"]["text"]
    assert "sys.path" in search["python"]["text"] and "PATH" in search["exec"]["text"]


def test_ranks_projection_numbers_and_text():
    rep = report.build(parse(fixture("julia_depot_walk.strace")), cluster_table(), ranks=1000)
    proj = rep["projection"]
    home = [m for m in proj["mounts"] if m["mountpoint"] == "/home"][0]
    assert home["metadata_total"] == 194 * 1000 and home["opens_total"] == 73 * 1000
    assert proj["total"]["ops_total"] == 303 * 1000
    assert proj["lines"][0] == "194 metadata ops x 1,000 ranks = 194,000 metadata ops on /home (nfs4)"
    big = report.build(parse(fixture("julia_depot_walk.strace")), cluster_table(), ranks=100_000)
    assert big["projection"]["lines"][0] == "194 metadata ops x 100,000 ranks = 19.4 M metadata ops on /home (nfs4)"
    text = render.report_table(big)
    assert "Projection: 100,000 simultaneous starts" in text and "19.4 M metadata ops on /home (nfs4)" in text
    local = report.build(parse(fixture("basic_f_y.strace")), MountTable(parse_mountinfo(
        "1 0 0:1 / / rw - ext4 /dev/sda rw\n")), ranks=500)
    assert local["projection"]["mounts"] == [] and "no operation reached a shared filesystem" in \
        local["projection"]["lines"][0]
    assert [report.fmt(n) for n in (0, 999, 12_000, 999_999, 12_000_000, 1_250_000, 3_400_000_000)] == \
        ["0", "999", "12,000", "999,999", "12 M", "1.25 M", "3.4 G"]


def test_table_columns_are_aligned():
    text = render.report_table(report.build(parse(fixture("julia_depot_walk.strace")), cluster_table(), ranks=10))
    block = text.split("By syscall\n")[1].split("\n\n")[0].splitlines()
    ends = {len(ln[:ln.index("ops") + 3]) for ln in block[:1]}
    ops_end = ends.pop()
    for ln in block[1:]:                      # the ops column is right-aligned under its header
        assert ln[ops_end - 1].isdigit() and (ln[ops_end] == " "), ln
    for title in ("Operations", "By mount point", "Top paths", "Top directories", "Likely causes", "Projection"):
        assert title in text


AFTER_IMAGE = """\
9000  execve("/opt/julia/bin/julia", ["julia", "-J/tmp/node/sys.so", "my_modules.jl"], 0x7ffe /* 31 vars */) = 0
9000  openat(AT_FDCWD</home/u/proj>, "/tmp/node/sys.so", O_RDONLY|O_CLOEXEC) = 3</tmp/node/sys.so>
9000  newfstatat(AT_FDCWD</home/u/proj>, "/home/u/proj/my_modules.jl", {st_mode=S_IFREG|0644, st_size=1, ...}, 0) = 0
9000  openat(AT_FDCWD</home/u/proj>, "my_modules.jl", O_RDONLY|O_CLOEXEC) = 4</home/u/proj/my_modules.jl>
9000  +++ exited with 0 +++
"""


def _reports(tmp_path):
    before = report.build(parse(fixture("julia_depot_walk.strace")), cluster_table(), command=["julia", "a.jl"])
    after = report.build(parse(AFTER_IMAGE), cluster_table(), command=["julia", "-J", "sys.so", "a.jl"])
    b, a = tmp_path / "before.json", tmp_path / "after.json"
    b.write_text(json.dumps(before))
    a.write_text(json.dumps(after))
    return before, after, str(b), str(a)


def test_compare_ratios(tmp_path):
    before, after, _, _ = _reports(tmp_path)
    cmp = report.compare(before, after, ranks=1000)
    rows = {r["metric"]: r for r in cmp["rows"]}
    assert rows["shared-FS metadata ops"]["before"] == 218 and rows["shared-FS metadata ops"]["after"] == 1
    assert rows["shared-FS metadata ops"]["ratio"] == 218.0
    assert rows["shared-FS operations"]["ratio"] == 303 / 2
    assert rows["/lustre/scratch (lustre): metadata ops"]["ratio"] == "inf"     # nothing left there
    assert rows["at 1,000 ranks: shared-FS metadata ops"]["before"] == 218_000
    text = render.compare_table(cmp)
    assert "all gone" in text and "218x" in text and "152x" in text


# ============================================================== the CLI
def vine(*args, cwd=None, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "vinehpc", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=timeout)


def test_cli_registered_and_usage_errors(tmp_path):
    r = vine("--help")
    assert r.returncode == 0 and "audit" in r.stdout
    r = vine("audit", "--help")
    assert r.returncode == 0 and "--ranks" in r.stdout and "--compare" in r.stdout and "--shared" in r.stdout
    r = vine("audit")
    assert r.returncode == 2 and "no command given" in r.stderr
    r = vine("audit", "--compare", "a.json", "b.json", "--", "true")
    assert r.returncode == 2 and "no command" in r.stderr


def test_cli_compare_and_bad_reports(tmp_path):
    _, _, b, a = _reports(tmp_path)
    r = vine("audit", "--compare", b, a, "--ranks", "1000")
    assert r.returncode == 0, r.stderr
    assert "before/after" in r.stdout and "all gone" in r.stdout and "at 1,000 ranks" in r.stdout
    r = vine("audit", "--compare", b, a, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["rows"][0]["metric"] == "shared-FS operations"
    junk = tmp_path / "junk.json"
    junk.write_text('{"x": 1}')
    r = vine("audit", "--compare", b, str(junk))
    assert r.returncode == 2 and "is not a vinehpc audit report" in r.stderr
    r = vine("audit", "--compare", b, str(tmp_path / "missing.json"))
    assert r.returncode == 2 and "cannot read" in r.stderr


def test_cli_from_trace_with_mountinfo_and_ranks(tmp_path):
    out = tmp_path / "rep.json"
    r = vine("audit", "--from-trace", os.path.join(DATA, "julia_depot_walk.strace"), "--mountinfo",
             os.path.join(DATA, "mountinfo_cluster.txt"), "--ranks", "1000", "--json", "-o", str(out))
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    assert rep["shared"]["metadata"] == 218 and rep["projection"]["total"]["metadata_total"] == 218_000
    assert rep["exit"]["code"] == 0 and "report written to" in r.stderr


def test_strace_missing_is_explained(tmp_path):
    (tmp_path / "bin").mkdir()
    env = dict(os.environ, PATH=str(tmp_path / "bin"))
    r = vine("audit", "--", "/bin/true", env=env)
    assert r.returncode == 125
    assert "strace is not installed" in r.stderr and "apt-get install strace" in r.stderr


def _fake_strace(tmp_path, message):
    d = tmp_path / "fakebin"
    d.mkdir()
    s = d / "strace"
    s.write_text("#!/bin/sh\necho '%s' >&2\nexit 1\n" % message)
    s.chmod(0o755)
    return dict(os.environ, PATH="%s:%s" % (d, os.environ.get("PATH", "")))


def test_ptrace_refused_is_explained(tmp_path):
    env = _fake_strace(tmp_path, "strace: test_ptrace_get_syscall_info: PTRACE_TRACEME: Operation not permitted")
    r = vine("audit", "--", "/bin/true", env=env)
    assert r.returncode == 125
    assert "ptrace is not permitted" in r.stderr and "SYS_PTRACE" in r.stderr and "Operation not permitted" in r.stderr


def test_broken_strace_is_reported(tmp_path):
    env = _fake_strace(tmp_path, "strace: something else went wrong")
    r = vine("audit", "--", "/bin/true", env=env)
    assert r.returncode == 125 and "strace does not work here: strace: something else went wrong" in r.stderr


# ============================================================== real strace
@functools.lru_cache(maxsize=None)
def _strace_problem():
    if not shutil.which("strace"):
        return "strace is not installed (tests/run.sh installs it: apt-get install strace)"
    r = subprocess.run(["strace", "-f", "-qq", "-o", os.devnull, "true"], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, timeout=60)
    if r.returncode != 0:
        return "strace cannot trace here: %s" % r.stderr.strip()
    return None


@pytest.fixture
def strace():
    problem = _strace_problem()
    require(problem is None, problem or "")


def audit_json(tmp_path, *args, cwd=None, name="rep.json"):
    out = tmp_path / name
    r = vine("audit", "--json", "-o", str(out), *args, cwd=cwd or str(tmp_path))
    rep = json.loads(out.read_text()) if out.exists() else None
    return r, rep


def test_real_python_import_json(strace, tmp_path):
    r, rep = audit_json(tmp_path, "--", PY, "-c", "import json; print(json.dumps([1]))")
    assert r.returncode == 0, r.stderr
    assert "[1]" in r.stdout                                   # the command's own output still flows
    assert rep["exit"] == {"code": 0, "signal": None, "text": "exited with 0"}
    assert rep["trace"]["unparsed"] == 0
    assert rep["command"] == [PY, "-c", "import json; print(json.dumps([1]))"]
    t = rep["totals"]
    assert t["opens"] > 5 and t["metadata"] > t["opens"] and t["exec"] >= 1 and t["distinct_paths"] > 20
    import json as _json
    json_dir = os.path.dirname(_json.__file__)
    assert any(p["dir"].startswith(json_dir) for p in rep["top_dirs"]) or \
        any(p["path"].startswith(json_dir) for p in rep["top_paths"])
    assert rep["processes"]["programs"] == {os.path.realpath(PY): 1} or PY in rep["processes"]["programs"]
    assert rep["strace"]["argv"][:2] == [shutil.which("strace"), "-f"] and rep["wall_seconds"] > 0


def test_real_shell_stats_in_a_shared_tree(strace, tmp_path):
    shared = tmp_path / "shared"
    tree = shared / "tree"
    for d in ("cfg", "lib", "p1", "p2", "p3", "p4"):
        (tree / d).mkdir(parents=True)
    (tree / "cfg" / "settings.toml").write_text("x = 1\n")
    (tree / "lib" / "libfoo.so.1").write_text("")
    script = ("cd tree && i=0; while [ $i -lt 25 ]; do test -e cfg/settings.toml; i=$((i+1)); done; "
              "for d in p1 p2 p3 p4 lib; do test -e $d/libfoo.so.1 && break; done; "
              "ls cfg > /dev/null; cat cfg/settings.toml > /dev/null")
    raw = tmp_path / "raw.strace"
    r, rep = audit_json(tmp_path, "--shared", str(shared), "--ranks", "1000", "--raw", str(raw), "--",
                        "/bin/sh", "-c", script, cwd=str(shared))
    assert r.returncode == 0, r.stderr
    sh = rep["shared"]
    assert sh["mounts"] == [str(shared)]
    assert sh["metadata"] >= 25 + 4 + 1 and sh["opens"] >= 1 and sh["ENOENT"] >= 4
    mount = [m for m in rep["mounts"] if m["mountpoint"] == str(shared)][0]
    assert mount["shared"] and "--shared" in mount["why"]
    settings = str(tree / "cfg" / "settings.toml")
    top = {p["path"]: p for p in rep["top_paths"]}
    assert top[settings]["metadata"] >= 25 and top[settings]["shared"]   # relative paths resolved after `cd`
    items = rep["causes"]["items"]
    repeated = [c for c in items if c["kind"] == "repeated"][0]
    assert repeated["paths"][0]["path"] == settings
    lib = [c for c in items if c["kind"] == "search" and c["search"] == "library"][0]
    assert lib["examples"][0]["name"] == "libfoo.so.1" and lib["examples"][0]["directories"] == 4
    assert lib["examples"][0]["found_in"] == str(tree / "lib")
    proj = rep["projection"]
    assert proj["mounts"][0]["metadata_total"] == sh["metadata"] * 1000
    assert proj["lines"][0].startswith("%s metadata ops x 1,000 ranks = " % report.fmt(sh["metadata"]))
    assert proj["lines"][0].endswith("on %s (%s)" % (shared, mount["fstype"]))
    # the raw trace was kept, and analyzing it again gives the same numbers
    assert raw.exists() and raw.stat().st_size > 0
    r2 = vine("audit", "--from-trace", str(raw), "--cwd", str(shared), "--shared", str(shared), "--json")
    assert r2.returncode == 0, r2.stderr
    again = json.loads(r2.stdout)
    assert again["totals"] == rep["totals"] and again["shared"] == rep["shared"]
    # and the table says the same
    r3 = vine("audit", "--shared", str(shared), "--ranks", "1000", "--", "/bin/sh", "-c", script, cwd=str(shared))
    assert r3.returncode == 0, r3.stderr
    assert "* %s" % shared in r3.stdout and "Projection: 1,000 simultaneous starts" in r3.stdout
    assert "shared-library search" in r3.stdout


def test_real_failing_command_reports_and_passes_its_exit_code(strace, tmp_path):
    r = vine("audit", "--", "/bin/sh", "-c", "test -e no_such_file; exit 3", cwd=str(tmp_path))
    assert r.returncode == 3
    assert "vinehpc audit: /bin/sh -c" in r.stdout and "exited with 3" in r.stdout     # the report still prints
    assert "ENOENT" in r.stdout
    assert "/bin/sh: exited with 3; the report covers" in r.stderr
    r = vine("audit", "--", "/bin/sh", "-c", "kill -TERM $$", cwd=str(tmp_path))
    assert r.returncode == 143 and "killed by SIGTERM" in r.stdout


def test_real_missing_and_unexecutable_commands(strace, tmp_path):
    r = vine("audit", "--", "no-such-command-vinehpc", cwd=str(tmp_path))
    assert r.returncode == 127 and "command not found" in r.stderr and "exit 127" in r.stderr
    r = vine("audit", "--", "./missing.sh", cwd=str(tmp_path))
    assert r.returncode == 127 and "no such file" in r.stderr
    plain = tmp_path / "plain.txt"
    plain.write_text("data\n")
    r = vine("audit", "--", str(plain), cwd=str(tmp_path))
    assert r.returncode == 126 and "not executable" in r.stderr
    r = vine("audit", "--", str(tmp_path), cwd=str(tmp_path))
    assert r.returncode == 126 and "is a directory" in r.stderr
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x7fELF\x00not really")
    garbage.chmod(0o755)
    r = vine("audit", "--", str(garbage), cwd=str(tmp_path))
    assert r.returncode == 126 and "cannot execute (ENOEXEC: not a program" in r.stderr
    script = tmp_path / "script"
    script.write_text("#!/no/such/interpreter\n")
    script.chmod(0o755)
    r = vine("audit", "--", str(script), cwd=str(tmp_path))
    assert r.returncode == 126 and "#! interpreter" in r.stderr


def test_real_ptrace_refused_under_another_tracer(strace, tmp_path):
    """A process has one tracer: under an outer `strace -f`, the audit's strace is refused (EPERM)."""
    r = subprocess.run(["strace", "-f", "-qq", "-o", os.devnull, PY, "-m", "vinehpc", "audit", "--", "/bin/true"],
                       cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
    assert r.returncode == 125, r.stderr
    assert "ptrace is not permitted" in r.stderr and "TracerPid" in r.stderr


def test_real_ctrl_c_still_reports(strace, tmp_path):
    """Ctrl-C reaches the whole foreground group: the command dies, the report of what it did prints."""
    p = subprocess.Popen([PY, "-m", "vinehpc", "audit", "--", "/bin/sh", "-c", "test -e before_sleep; sleep 30"],
                         cwd=str(tmp_path), start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        deadline = time.monotonic() + 30
        def sleeping():
            try:
                return any(c.name() == "sleep" for c in psutil.Process(p.pid).children(recursive=True))
            except psutil.Error:
                return False
        while not sleeping():
            assert time.monotonic() < deadline and p.poll() is None, "the traced sleep never started"
            time.sleep(0.05)
        os.killpg(p.pid, signal.SIGINT)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 130, err
    assert "interrupted (Ctrl-C)" in out and "ENOENT" in out          # the test -e before the sleep
