"""Putting task outputs in place on the manager's side (used by the I/O thread)."""
import os
import shutil
import tarfile


def install_output(part, dest, is_tar):
    """Put a received output in place atomically (a directory arrives as a tar)."""
    if not is_tar:
        os.replace(part, dest)
        return
    tmp = part + ".d"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        with tarfile.open(part) as tar:
            tar.extractall(tmp, filter="data")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.unlink(part)
    if os.path.isdir(dest) and not os.path.islink(dest):
        old = part + ".old"
        os.rename(dest, old)
        os.rename(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)


class Sink:
    """Swallows an output that cannot be written (the task is reported as failed)."""

    def __init__(self, dest):
        self.dest = dest
        self.name = None

    def write(self, b):
        pass

    def close(self):
        pass


def discard(f):
    try:
        f.close()
        if f.name:
            os.unlink(f.name)
    except (OSError, TypeError):
        pass
