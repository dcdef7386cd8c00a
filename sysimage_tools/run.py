"""`vinehpc sysimage run IMAGE -- CMD`: run a command inside an image unpacked node-local.

Standard library + zstandard only (runs on nodes; `python -m sysimage_tools run` avoids even
importing the engine).
"""
from __future__ import annotations

import os
import shutil
import sys

from .deploy import ensure_local
from .image import ImageError


def run(image_path, argv, *, local_dir=None, expected_hash=None) -> int:
    """Unpack `image_path` once per node, then exec `argv` inside it (returns only on error)."""
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print("vinehpc sysimage run: give the command after --: vinehpc sysimage run IMAGE -- CMD [ARGS]",
              file=sys.stderr)
        return 2
    try:
        try:
            env = ensure_local(image_path, expected_hash, local_dir=local_dir)
        except ImportError:
            if not sys.flags.no_site:
                raise
            # the cheap launcher (launch.py, python -S): the first unpack on a node needs zstandard
            # from site-packages; an image already unpacked never gets here
            import site
            site.main()
            env = ensure_local(image_path, expected_hash, local_dir=local_dir)
    except ImageError as e:
        print("vinehpc sysimage run: %s" % e, file=sys.stderr)
        return 2
    child_env = env.env_for(os.environ)
    exe = shutil.which(argv[0], path=child_env.get("PATH")) if os.sep not in argv[0] else argv[0]
    if exe is None or not os.path.exists(exe):
        print("vinehpc sysimage run: command not found: %s" % argv[0], file=sys.stderr)
        return 127
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(exe, argv, child_env)
    except OSError as e:
        print("vinehpc sysimage run: cannot run %s: %s" % (argv[0], e.strerror or e), file=sys.stderr)
        return 126
