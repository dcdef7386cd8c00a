"""One directory per task; inputs linked in under their remote names.

Every path a task description names is resolved inside the sandbox and refused if it
would leave it, whatever the manager sent.
"""
from __future__ import annotations

import os
import shutil


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
            shutil.rmtree(self.path, ignore_errors=True)
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

    def resolve_link(self, p: str, inputs=()) -> None:
        """An output at p that is a symbolic link becomes a copy of its target, so what is kept is
        never a link that dangles once the sandbox (or a task-level input) is gone.  The target must
        be inside the sandbox or one of the task's `inputs` (real paths): a link to anything else on
        the worker is refused (SandboxError), as is a dangling one."""
        if not os.path.islink(p):
            return
        target = os.path.realpath(p)
        roots = [os.path.realpath(self.path)] + list(inputs)
        if not any(target == r or target.startswith(r + os.sep) for r in roots):
            raise SandboxError("output %r is a symbolic link to %r, outside the task's sandbox: refused"
                               % (os.path.relpath(p, self.path), os.readlink(p)))
        if not os.path.exists(target):
            raise SandboxError("output %r is a dangling symbolic link (to %r)"
                               % (os.path.relpath(p, self.path), os.readlink(p)))
        tmp = p + ".vinehpc-copy"
        if os.path.isdir(target):
            shutil.copytree(target, tmp, symlinks=True)
            os.unlink(p)
            os.rename(tmp, p)
        else:
            shutil.copy2(target, tmp)
            os.replace(tmp, p)


def _remove_tree(path: str) -> None:
    """rmtree, with a fast path for the common flat sandbox (links and a few files)."""
    try:
        with os.scandir(path) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    shutil.rmtree(e.path, ignore_errors=True)
                else:
                    try:
                        os.unlink(e.path)
                    except FileNotFoundError:
                        pass
        os.rmdir(path)
    except OSError:
        shutil.rmtree(path, ignore_errors=True)
