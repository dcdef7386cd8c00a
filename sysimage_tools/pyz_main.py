"""__main__ of vinehpc.pyz (copied into the archive by selfpack.py).  Standard library only.

`python3 vinehpc.pyz worker HOST:PORT ...` / `python3 vinehpc.pyz pilot tasks.py ...`:
  1. refuse an interpreter of another ABI than the archive's compiled dependencies need;
  2. unpack the payload (vinehpc + cloudpickle, psutil, zstandard, orjson, byte-compiled) once per node
     into the node-local cache, with sysimage_tools.deploy's lock (one process unpacks, the
     others wait; never on $HOME unless VINEHPC_LOCAL_DIR says so);
  3. run vinehpc from that copy (the manifest's "entry" module as __main__, i.e. `python -m
     vinehpc`), with PYTHONPATH pointing at it so the processes vinehpc starts (Python task
     interpreters, the pilot's workers) use it too.
It names the entry module instead of importing vinehpc: sysimage_tools is a leaf below the engine.
"""
import json
import os
import runpy
import sys

MANIFEST = "_vinehpc_pyz/manifest.json"


def _fail(msg, code=2):
    sys.stderr.write("vinehpc.pyz: %s\n" % msg)
    sys.stderr.flush()
    sys.exit(code)


def main():
    pyz = os.path.dirname(os.path.abspath(__file__))
    import zipfile
    try:
        with zipfile.ZipFile(pyz) as z:
            man = json.loads(z.read(MANIFEST).decode("utf-8"))
    except (OSError, zipfile.BadZipFile, KeyError, ValueError) as e:
        _fail("cannot read %s (truncated or corrupted? copy it again): %s" % (pyz, e))
    want = man["python"]
    import sysconfig
    here = (sys.implementation.cache_tag, sysconfig.get_platform())
    if here != (want["cache_tag"], want["platform"]):
        _fail("%s was built for %s on %s (Python %s) but this python (%s) is %s on %s: run it with a matching "
              "python3, or build one for this python with `%s -m vinehpc sysimage self -o vinehpc.pyz` where "
              "vinehpc is installed" % (pyz, want["cache_tag"], want["platform"], want["version"], sys.executable,
                                        here[0], here[1], sys.executable))
    sys.path.insert(0, pyz + "/payload")
    try:
        from sysimage_tools import deploy
        root = deploy.ensure_unpacked("pyz-" + man["id"], lambda tmp: deploy.unpack_zip(pyz, man, tmp),
                                      what=pyz)
    except Exception as e:      # ImageError, DeployError, and a payload too damaged to import
        _fail(str(e))
    # from here on everything comes from the node-local copy, never from the archive
    sys.path[:] = [root] + [p for p in sys.path if p != pyz and not p.startswith(pyz + "/")]
    for name in list(sys.modules):
        if name == "sysimage_tools" or name.startswith("sysimage_tools."):
            del sys.modules[name]
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = root + (os.pathsep + old if old else "")
    sys.argv[0] = pyz
    runpy.run_module(man["entry"], run_name="__main__")     # its __main__ exits with the status


if __name__ == "__main__":
    main()
