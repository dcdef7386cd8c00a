"""`vinehpc audit`: the subcommand's arguments and its entry point (thin: parse, call, print)."""
from __future__ import annotations

import argparse
import os
import sys

# Only argparse at import time: `vinehpc` builds every subcommand's parser on each start.
MOUNTINFO = "/proc/self/mountinfo"

EPILOG = """\
examples:
  vinehpc audit -- python -c "import scipy"
  vinehpc audit --ranks 1000 --shared $HOME -- julia --project my_modules.jl
  vinehpc audit --json -o before.json --shared /proj -- python tasks.py
  vinehpc audit --compare before.json after.json
  strace -f -y -o trace.txt CMD;  vinehpc audit --from-trace trace.txt --cwd DIR

The report goes to stdout after CMD ends (or to -o FILE). vinehpc audit exits with CMD's exit
code (128+N if a signal N killed it); 127: CMD not found, 126: not executable, 125: the audit
itself could not run (no strace, ptrace not permitted).
"""


def _positive(s):
    try:
        v = int(s.replace(",", "").replace("_", ""))
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError("expected a positive integer, got %r" % s)
    return v


def add_parser(sub) -> argparse.ArgumentParser:
    """Register `audit` on the `vinehpc` subparsers object."""
    a = sub.add_parser(
        "audit", help="count a command's filesystem operations (strace) and project them to N ranks",
        description="Run CMD under strace -f and report its file operations: per syscall and result, metadata "
                    "ops vs opens, top paths and directories, per mount point with shared (network/parallel) "
                    "filesystems marked, the likely causes of a stat storm, and the load at N simultaneous starts.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("--json", action="store_true", help="the report as JSON (the input of --compare)")
    a.add_argument("-o", "--output", metavar="FILE", help="write the report to FILE instead of stdout")
    a.add_argument("--raw", metavar="FILE", help="keep strace's output in FILE")
    a.add_argument("--shared", metavar="PREFIX", action="append", default=[],
                   help="count the tree under PREFIX as a shared filesystem (repeatable)")
    a.add_argument("--ranks", type=_positive, metavar="N", help="project the shared-filesystem load of N simultaneous "
                                                                "starts")
    a.add_argument("--top", type=_positive, default=15, metavar="K", help="rows of top paths/directories (default 15)")
    a.add_argument("--compare", nargs=2, metavar=("BEFORE.json", "AFTER.json"),
                   help="show two --json reports side by side with the reduction")
    a.add_argument("--from-trace", metavar="FILE",
                   help="analyze an existing trace (strace -f -y -o FILE CMD) instead of running a command")
    a.add_argument("--cwd", metavar="DIR", help="with --from-trace: the directory the traced command started in")
    a.add_argument("--mountinfo", metavar="FILE", default=MOUNTINFO,
                   help="the mount table to classify paths with (default %(default)s)")
    a.add_argument("--no-seccomp", action="store_true",
                   help="do not use strace --seccomp-bpf (slower; for old kernels)")
    a.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    return a


def cmd_audit(args) -> int:
    """The `vinehpc audit` command: returns the exit status."""
    from .mounts import MountTable, read_mounts
    from .runner import AuditError
    cmd = list(args.cmd or [])
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    try:
        if args.compare:
            if cmd or args.from_trace:
                raise AuditError("--compare takes two reports and no command", 2)
            return _compare(args)
        if args.from_trace and cmd:
            raise AuditError("give either --from-trace FILE or a command, not both", 2)
        if not args.from_trace and not cmd:
            raise AuditError("no command given: vinehpc audit [options] -- CMD [ARGS...]", 2)
        table = MountTable(read_mounts(args.mountinfo), args.shared)
        if args.from_trace:
            return _from_trace(args, table)
        return _audit(args, cmd, table)
    except AuditError as e:
        print("vinehpc audit: %s" % e, file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:            # before the command ran, or while the report was made
        print("vinehpc audit: interrupted", file=sys.stderr)
        return 130


def _audit(args, cmd, table) -> int:
    from . import report
    from .runner import NOT_EXECUTABLE, run
    r = run(cmd, raw=args.raw, seccomp=not args.no_seccomp)
    try:
        trace = _parse_file(r.trace_path, r.cwd)
    finally:
        if not args.raw:
            _unlink(r.trace_path)
    ex = dict(r.exit)
    root = trace.root
    if root.get("signal") and "core dumped" in root["signal"] and ex.get("signal"):
        ex["text"] = ex["text"].replace("killed by %s" % ex["signal"], "killed by %s" % root["signal"])
    not_executed = _failed_exec(trace)
    if not_executed:
        why = {"ENOEXEC": ": not a program this system can run, and no #! line",
               "ENOENT": ": its #! interpreter (or program loader) does not exist",
               "EACCES": ": permission denied"}.get(not_executed, "")
        print("vinehpc audit: %s: cannot execute (%s%s); exit %d" % (cmd[0], not_executed, why, NOT_EXECUTABLE),
              file=sys.stderr)
        return NOT_EXECUTABLE
    rep = report.build(trace, table, top=args.top, ranks=args.ranks, command=cmd, cwd=r.cwd, exit=ex,
                       wall_seconds=r.wall_seconds, strace=r.strace)
    _emit(args, rep)
    if ex["code"]:
        print("vinehpc audit: %s: %s; the report covers what it did until then" % (cmd[0], ex["text"]),
              file=sys.stderr)
    return ex["code"]


def _from_trace(args, table) -> int:
    from . import report
    from .runner import exit_info
    trace = _parse_file(args.from_trace, args.cwd)
    root = trace.root
    ex = None
    if root.get("signal"):
        ex = {"code": None, "signal": root["signal"], "text": "killed by " + root["signal"]}
    elif root.get("exit_code") is not None:
        ex = exit_info(root["exit_code"])
    rep = report.build(trace, table, top=args.top, ranks=args.ranks, cwd=args.cwd, exit=ex)
    _emit(args, rep)
    return 0


def _compare(args) -> int:
    import json
    from . import render, report
    from .runner import AuditError
    reps = []
    for path in args.compare:
        try:
            with open(path) as f:
                reps.append(report.check_report(json.load(f), path))
        except OSError as e:
            raise AuditError("cannot read %s: %s" % (path, e.strerror or e), 2)
        except ValueError as e:
            raise AuditError("%s: %s" % (path, e) if "vinehpc audit report" not in str(e) else str(e), 2)
    cmp = report.compare(reps[0], reps[1], ranks=args.ranks)
    _write(args, json.dumps(cmp, indent=2) + "\n" if args.json else render.compare_table(cmp))
    return 0


def _parse_file(path, cwd):
    from . import parser as _parser
    from .runner import AuditError
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return _parser.parse(f, cwd=cwd)
    except OSError as e:
        raise AuditError("cannot read the trace %s: %s" % (path, e.strerror or e))


def _failed_exec(trace):
    """The errno when the command itself could not be executed (its first execve failed, none succeeded)."""
    from . import parser as _parser
    root = trace.root
    if root.get("exec"):
        return None
    for op in trace.ops:
        if op.pid == trace.root_pid and op.kind == _parser.EXEC:
            return op.result if op.result not in (_parser.OK, _parser.UNKNOWN) else None
    return None


def _emit(args, rep):
    import json
    from . import render
    _write(args, json.dumps(rep, indent=2) + "\n" if args.json else render.report_table(rep))


def _write(args, text):
    from .runner import AUDIT_FAILED, AuditError
    if args.output:
        try:
            with open(args.output, "w") as f:
                f.write(text)
        except OSError as e:
            raise AuditError("cannot write %s: %s" % (args.output, e.strerror or e), AUDIT_FAILED)
        print("vinehpc audit: report written to %s" % args.output, file=sys.stderr)
        return
    sys.stdout.flush()
    sys.stdout.write(text)
    sys.stdout.flush()


def _unlink(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def main(argv=None) -> int:
    """`python -m sysimage_tools.audit.cli ...` (the same as `vinehpc audit ...`)."""
    p = argparse.ArgumentParser(prog="vinehpc")
    add_parser(p.add_subparsers(dest="command"))
    return cmd_audit(p.parse_args(["audit"] + list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
