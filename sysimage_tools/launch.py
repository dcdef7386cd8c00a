"""The cheap image launcher, for job scripts that start a command from an image on many nodes:

    python3 -S /path/to/sysimage_tools/launch.py IMAGE [--local-dir DIR] [--] CMD [ARGS]

Does what `vinehpc sysimage run` does (unpack IMAGE once per node, exec CMD inside it) at almost
no cost to the shared filesystem the launcher itself lives on: run as a file with -S, Python
skips site-packages (its .pth files and editable installs are hundreds of lookups); the
arguments are parsed by hand (argparse looks up gettext catalogues, messages.mo, in four
locale directories per message); only the standard library and this package's run path are
imported (not the vinehpc engine).  `vinehpc audit` measures it: see the README's numbers.
The first unpack on a node needs `zstandard` from site-packages: only then is `site` loaded.
"""
import os
import sys

if not __package__:
    # run as a file: every import looks in each sys.path entry in turn (a stat of the directory
    # each time), so the standard library goes first and this package's parent last; the
    # script's own directory and PYTHONPATH's entries (the launcher needs neither) go
    _skip = {sys.path[0]} | set(filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    sys.path[:] = [p for p in sys.path if p not in _skip] + [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

from sysimage_tools.run import run  # noqa: E402  (after the path is set)

USAGE = "usage: python3 -S %s IMAGE [--local-dir DIR] [--] CMD [ARGS]" % (sys.argv[0] or "launch.py")


def main(argv) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr if not argv else sys.stdout)
        return 2 if not argv else 0
    image, rest, local_dir = argv[0], argv[1:], None
    if rest[:1] == ["--local-dir"]:
        if len(rest) < 2:
            print(USAGE, file=sys.stderr)
            return 2
        local_dir, rest = rest[1], rest[2:]
    return run(image, rest, local_dir=local_dir)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
