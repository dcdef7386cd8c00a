"""`vinehpc sysimage self -o vinehpc.pyz`: vinehpc as one file that needs only a matching python3.

The archive is a zipapp:

    __main__.py                  sysimage_tools/pyz_main.py: ABI check, node-local unpack, run ENTRY
    _vinehpc_pyz/manifest.json   python ABI, payload id, every payload file's sha256/size/mode,
                                 the entry module (`python -m vinehpc`)
    payload/                     vinehpc, launcher, userlevel_net, sysimage_tools and the
                                 dependencies (cloudpickle, psutil, zstandard, orjson, + --include),
                                 byte-compiled with unchecked-hash pycs for this interpreter

The payload is unpacked (not imported from the zip) because compiled extensions cannot be
loaded from a zip, and because the worker starts helpers by file path (guardian.py,
pyrunner.py) and other interpreters that must find vinehpc through PYTHONPATH.  Plain deflate
(stdlib zlib) is used so the bootstrap needs nothing beyond the standard library.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.metadata as md
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import zipapp

from . import image, pyenv

PACKAGES = ("vinehpc", "launcher", "userlevel_net", "sysimage_tools")
ENTRY = "vinehpc"           # run as __main__ (named, not imported: sysimage_tools is below the engine)
DEPENDENCIES = ("cloudpickle", "psutil", "zstandard", "orjson")
# zstandard's cffi backend (12 MB) is only a fallback for when its C backend cannot load; it would
# also need cffi, which is not packed
LEAVE_OUT = ("zstandard/_cffi.", "zstandard/backend_cffi.")


def build(out: str, *, include=(), command=None, log=None) -> dict:
    """Write vinehpc.pyz to `out`; returns its manifest."""
    log = log or (lambda msg: None)
    stage = tempfile.mkdtemp(prefix="vinehpc-pyz-")
    try:
        payload = os.path.join(stage, "payload")
        os.makedirs(payload)
        for name in PACKAGES:
            spec = importlib.util.find_spec(name)
            if spec is None or not spec.submodule_search_locations:
                raise image.ImageError("cannot find the %s package to pack" % name)
            pyenv.copy_tree(list(spec.submodule_search_locations)[0], os.path.join(payload, name))
        version = _version(os.path.join(payload, ENTRY, "__init__.py"))
        info_dir = os.path.join(payload, "vinehpc-%s.dist-info" % version)
        os.makedirs(info_dir)
        with open(os.path.join(info_dir, "METADATA"), "w") as f:
            f.write("Metadata-Version: 2.1\nName: vinehpc\nVersion: %s\n" % version)
        packages = {"vinehpc": version}
        for name in tuple(DEPENDENCIES) + tuple(include):
            try:
                dist = md.distribution(name)
            except md.PackageNotFoundError:
                raise image.ImageError("%s is not installed in this python (%s): pip install %s"
                                       % (name, sys.executable, name)) from None
            for w in pyenv.copy_distribution(dist, payload):
                log(w)
            packages[dist.metadata["Name"]] = dist.version
        for rel, kind, p in image.scan(payload):
            if kind == "f" and rel.startswith(LEAVE_OUT):
                os.unlink(p)
        pyenv.compile_tree(payload)
        files = {}
        for rel, kind, p in image.scan(payload):
            if kind == "l":
                raise image.ImageError("cannot pack a symbolic link into vinehpc.pyz: %s" % p)
            if kind == "f":
                with open(p, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                files[rel] = ["f", digest, os.path.getsize(p), os.stat(p).st_mode & 0o777]
        payload_id = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
        info = pyenv.python_info()
        manifest = {
            "format": "vinehpc-pyz", "format_version": 1, "id": payload_id, "entry": ENTRY,
            "created": pyenv._now(), "created_by": "vinehpc " + version, "command": list(command or sys.argv),
            "python": {k: info[k] for k in ("implementation", "version", "cache_tag", "soabi", "platform",
                                            "machine")},
            "packages": packages, "files": files,
        }
        os.makedirs(os.path.join(stage, "_vinehpc_pyz"))
        with open(os.path.join(stage, "_vinehpc_pyz", "manifest.json"), "w") as f:
            json.dump(manifest, f, sort_keys=True)
        shutil.copyfile(os.path.join(os.path.dirname(os.path.abspath(__file__)), "pyz_main.py"),
                        os.path.join(stage, "__main__.py"))
        tmp = "%s.tmp-%d" % (out, os.getpid())
        try:
            zipapp.create_archive(stage, tmp, interpreter="/usr/bin/env python3", compressed=True)
            os.replace(tmp, out)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return manifest
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _version(init_py: str) -> str:
    """The `__version__ = "..."` of the packed code itself (read, not imported)."""
    with open(init_py, encoding="utf-8") as f:
        for node in ast.parse(f.read(), init_py).body:
            if (isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["__version__"]
                    and isinstance(node.value, ast.Constant)):
                return str(node.value.value)
    raise image.ImageError("%s has no __version__ to record" % init_py)
