"""`vinehpc audit`: count what a command does to the filesystems, and what that costs at scale.

    runner.py   runs CMD under ``strace -f`` (clear errors: no strace, no ptrace, no CMD)
    parser.py   a pure function of strace text -> file operations with absolute paths
    syntax.py   the text of one line: strings, escapes, argument lists, fd decorations, results
    mounts.py   /proc/self/mountinfo, longest-prefix match, shared-filesystem classification
    report.py   aggregation, likely causes, --ranks projection, --compare
    render.py   the terminal tables
    cli.py      the `vinehpc audit` subcommand (argparse + dispatch)

Standard library only. Nothing is imported until used: `vinehpc` registers this subcommand on
every start (cli.add_parser needs only argparse).
"""
__all__ = ["Op", "Trace", "parse"]


def __getattr__(name):
    if name in __all__:
        from . import parser
        return getattr(parser, name)
    raise AttributeError("module %r has no attribute %r" % (__name__, name))
