"""A pilot's contact file: RUN_DIR/contact.json, how workers from elsewhere join the run
(`vinehpc worker --contact FILE`).  It holds the run's secret, so it is private (0600)."""
from __future__ import annotations

import json
import os
import time

from vinehpc.protocol.auth import create_private, open_private


def write_contact(run_dir, address, secret, job_id=None, tls_fingerprint=None):
    """`tls_fingerprint`: the manager's TLS certificate's (a pilot with --ssl), None without TLS."""
    path = os.path.join(run_dir, "contact.json")
    with create_private(path + ".tmp") as f:
        json.dump({"address": address, "secret": secret, "job": job_id, "tls": tls_fingerprint,
                   "pid": os.getpid(), "started": time.time()}, f)
    os.replace(path + ".tmp", path)
    return path


def read_contact(path):
    """(address, secret) from a pilot's contact file (which must not be readable by others)."""
    return read_contact_tls(path)[:2]


def read_contact_tls(path):
    """(address, secret, TLS fingerprint or None) from a pilot's contact file."""
    with open_private(path, "contact file") as f:
        d = json.load(f)
    return d["address"], d["secret"], d.get("tls")
