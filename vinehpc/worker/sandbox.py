"""One directory per task; inputs linked in under their remote names.

Every path a task description names is resolved inside the sandbox and refused if it
would leave it, whatever the manager sent.
"""
from __future__ import annotations

import os
import shutil

from ..comm.receive import remove_path


class SandboxError(Exception):
    pass


def inside(root: str, name: str) -> str:
    """root/name, refusing absolute names, '..', NUL and anything resolving outside root."""
    if not isinstance(name, str) or not name or "\0" in name or name.startswith("/"):
        raise SandboxError("refusing file name %r: not a relative path" % (name,))
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise SandboxError("refusing file name %r: it contains '..', '.' or an empty component" % name)
    path = os.path.join(root, name)
    real_root = os.path.realpath(root)
    parent = os.path.realpath(os.path.dirname(path))
    if parent != real_root and not parent.startswith(real_root + os.sep):
        raise SandboxError("refusing file name %r: it resolves outside the sandbox" % name)
    return path


class Sandbox:
    def __init__(self, parent: str, tid):
        self.path = os.path.join(parent, "t.%s" % tid)
        if os.path.exists(self.path):
            remove_path(self.path)
        os.makedirs(self.path)

    def link(self, src: str, remote: str) -> None:
        dst = inside(self.path, remote) if "/" not in remote else self._mkparents(remote)
        try:
            os.symlink(src, dst)
        except FileExistsError:
            raise SandboxError("two inputs use the remote name %r" % remote) from None

    def _mkparents(self, remote):
        d = os.path.join(self.path, os.path.dirname(remote))
        inside(self.path, os.path.dirname(remote))
        os.makedirs(d, exist_ok=True)
        return inside(self.path, remote)

    def existing(self, remote: str):
        """Path of an output if the task created it (None if not)."""
        p = inside(self.path, remote)
        return p if os.path.lexists(p) else None

    def remove(self) -> None:
        _remove_tree(self.path)

    def resolve(self, p: str, inputs=(), *, copy: bool = False) -> str:
        """The path to read for output p, refusing (SandboxError) what would read the worker's files:
        a link -- p itself or one inside a directory p -- may point into the sandbox or one of the
        task's `inputs` (real paths), nothing else, and not dangle.  copy: links are replaced by
        copies of their targets (a temp kept in the cache must not depend on the sandbox or a
        task-level input); else the path of p's target is returned and links inside it are left
        for the reader to follow (a tar with dereference)."""
        roots = [os.path.realpath(self.path)] + list(inputs)
        if os.path.islink(p):
            target = self._target(p, p, roots)
            if not copy:
                p = target
            else:
                _copy_over(target, p)
        if os.path.isdir(p) and not os.path.islink(p):
            top = os.path.realpath(p)
            for d, dirs, files in os.walk(p):
                for name in dirs + files:
                    q = os.path.join(d, name)
                    if not os.path.islink(q):
                        continue
                    real = os.path.realpath(q)
                    if real == top or real.startswith(top + os.sep):
                        continue            # stays inside the output: kept as a link
                    target = self._target(q, p, roots)
                    if copy:
                        _copy_over(target, q)
        return p

    def _target(self, q, out, roots) -> str:
        """The real target of link q (inside output `out`), if the task may hand it over."""
        target = os.path.realpath(q)
        shown = os.path.relpath(q, self.path)
        what = "output %r" % shown if q == out else "output %r holds %r, which" % (os.path.relpath(out, self.path), shown)
        if not any(target == r or target.startswith(r + os.sep) for r in roots):
            raise SandboxError("%s is a symbolic link to %r, outside the task's sandbox: refused"
                               % (what, os.readlink(q)))
        if not os.path.exists(target):
            raise SandboxError("%s is a dangling symbolic link (to %r)" % (what, os.readlink(q)))
        return target


def _copy_over(target, link):
    """Replace symbolic link `link` by a copy of `target` (a file or a directory)."""
    tmp = link + ".vinehpc-copy"
    if os.path.isdir(target):
        shutil.copytree(target, tmp, symlinks=True)
        os.chmod(tmp, 0o755)       # a copy of a read-only input: it must be movable into the cache
        os.unlink(link)
        os.rename(tmp, link)
    else:
        shutil.copy2(target, tmp)
        os.replace(tmp, link)


def _remove_tree(path: str) -> None:
    """rmtree, with a fast path for the common flat sandbox (links and a few files)."""
    try:
        with os.scandir(path) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    remove_path(e.path)       # (read-only directories too: a copy of an input)
                else:
                    try:
                        os.unlink(e.path)
                    except FileNotFoundError:
                        pass
        os.rmdir(path)
    except OSError:
        remove_path(path)
