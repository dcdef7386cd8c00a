"""Outbound-access probe: what can this node reach, and which remedies can it use?

`probe()` runs on one node (locally for `vinehpc net probe`, or as a PythonTask on every worker
through Manager.probe_network(), see vinehpc/netprobe.py); it needs only the standard library
and returns a JSON-able dict.
`render_table()` turns a list of such dicts (one per node) into an aligned table.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import subprocess
import threading
import time

PROXY_VARS = ("http_proxy", "https_proxy", "ftp_proxy", "all_proxy", "no_proxy")
TUNNEL_HINT = "use Manager(tunnel=True) / vinehpc run --tunnel"
NS_HINT = "programs that ignore proxy variables: vinehpc net ns --tunnel -- CMD"


# ------------------------------------------------------------------ targets
def parse_target(spec: str) -> tuple:
    """'HOST:PORT', '[V6ADDR]:PORT' or an http(s) URL -> (host, port). Raises ValueError."""
    s = spec.strip()
    m = re.match(r"^(https?)://(?:[^@/]*@)?(\[[^\]]+\]|[^:/]+)(?::(\d+))?", s)
    if m:
        host, port = m.group(2), int(m.group(3) or (443 if m.group(1) == "https" else 80))
    else:
        m = re.match(r"^(\[[^\]]+\]|[^:\[\]]+):(\d+)$", s)
        if not m:
            raise ValueError("a target is HOST:PORT, [IPV6]:PORT or an http(s) URL, got %r" % spec)
        host, port = m.group(1), int(m.group(2))
    host = host.strip("[]")
    if not host or not 0 < port < 65536:
        raise ValueError("a target is HOST:PORT with a port in 1..65535, got %r" % spec)
    return host, port


def _with_deadline(fn, timeout):
    """fn() in a daemon thread: (value, None), (None, exception) or (None, TimeoutError).
    getaddrinfo has no timeout of its own; a hung resolver must not hang the probe."""
    box = {}

    def run():
        try:
            box["v"] = fn()
        except BaseException as e:   # reported, never raised
            box["e"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        return None, TimeoutError("no answer within %g s" % timeout)
    return box.get("v"), box.get("e")


def _ms(t0):
    return round((time.monotonic() - t0) * 1000.0, 1)


def resolve(host: str, port: int = 0, timeout: float = 3.0) -> dict:
    """DNS resolution of `host`: {"ok", "addresses", "ms"} or {"ok": False, "error", "ms"}."""
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
        return {"ok": True, "addresses": [host], "ms": 0.0, "literal": True}
    except OSError:
        pass
    t0 = time.monotonic()
    infos, err = _with_deadline(lambda: socket.getaddrinfo(host, port or None, type=socket.SOCK_STREAM), timeout)
    if err is not None:
        msg = err.strerror if isinstance(err, socket.gaierror) and err.strerror else str(err)
        return {"ok": False, "error": msg, "ms": _ms(t0)}
    addrs = []
    for fam, _, _, _, sa in infos:
        if sa[0] not in addrs:
            addrs.append(sa[0])
    return {"ok": True, "addresses": addrs, "ms": _ms(t0)}


def _status_of(e: BaseException) -> str:
    if isinstance(e, (socket.timeout, TimeoutError)):
        return "timeout"
    if isinstance(e, ConnectionRefusedError):
        return "refused"
    if isinstance(e, OSError) and e.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL,
                                              errno.EPERM, errno.EACCES):
        return "unreachable"   # EPERM/EACCES: a local firewall rejected the packet
    return "error"


def connect(host: str, port: int, timeout: float = 3.0) -> dict:
    """Resolve, then TCP-connect to `host`:`port` (each address in turn, like create_connection).
    -> {"target", "status": ok|refused|timeout|unreachable|dns|error, "ms", "address"?, "error"?}"""
    target = "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)
    row = {"target": target, "host": host, "port": port}
    dns = resolve(host, port, timeout)
    row["dns"] = dns
    if not dns["ok"]:
        row.update(status="dns", error="cannot resolve %s: %s" % (host, dns["error"]), ms=dns["ms"])
        return row
    last = None
    t0 = time.monotonic()
    for addr in dns["addresses"]:
        fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.settimeout(max(0.05, timeout - (time.monotonic() - t0)))
        try:
            s.connect((addr, port))
            row.update(status="ok", address=addr, ms=_ms(t0))
            return row
        except OSError as e:
            last = e
        finally:
            s.close()
    row.update(status=_status_of(last), error="%s: %s" % (type(last).__name__, last), ms=_ms(t0))
    return row


# ------------------------------------------------------------------ environment
def mask_credentials(value: str) -> str:
    """'http://user:secret@host:3128' -> 'http://user:***@host:3128' (a bare 'user@' is kept)."""
    return re.sub(r"(://[^/@:\s]*):[^/@\s]*@", r"\1:***@", value)


def proxy_variables(environ=None) -> dict:
    env = os.environ if environ is None else environ
    out = {}
    for name in PROXY_VARS:
        for n in (name, name.upper()):
            if env.get(n):
                out[n] = mask_credentials(env[n])
    return out


def _read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _run(argv, timeout):
    try:
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, timeout=timeout)
        return r.returncode, (r.stdout + r.stderr).strip()
    except subprocess.TimeoutExpired:
        return None, "no answer within %g s" % timeout
    except OSError as e:
        return None, str(e)


def userns_status(timeout: float = 3.0) -> dict:
    """Can this user create a user+network namespace? Reads the sysctls, then really tries."""
    st = {"unprivileged_userns_clone": _read("/proc/sys/kernel/unprivileged_userns_clone"),
          "max_user_namespaces": _read("/proc/sys/user/max_user_namespaces"),
          "apparmor_restrict": _read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns")}
    unshare = shutil.which("unshare")
    if unshare is None:
        st.update(ok=False, error="unshare (util-linux) not on PATH")
        return st
    rc, out = _run([unshare, "--user", "--map-root-user", "--net", "true"], timeout)
    if rc == 0:
        st["ok"] = True
    else:
        why = []
        if st["unprivileged_userns_clone"] == "0":
            why.append("kernel.unprivileged_userns_clone=0")
        if st["max_user_namespaces"] == "0":
            why.append("user.max_user_namespaces=0")
        if st["apparmor_restrict"] == "1":
            why.append("kernel.apparmor_restrict_unprivileged_userns=1")
        st.update(ok=False, error="unshare --user --net failed: %s%s" % (out.splitlines()[-1] if out else rc,
                                                                        " (%s)" % ", ".join(why) if why else ""))
    return st


def slirp_status(timeout: float = 3.0) -> dict:
    path = shutil.which("slirp4netns")
    if path is None:
        return {"ok": False, "error": "slirp4netns not on PATH (apt-get install slirp4netns uidmap)"}
    rc, out = _run([path, "--version"], timeout)
    first = out.splitlines()[0] if out else ""
    version = first.split()[-1] if rc == 0 and first else None
    return {"ok": rc == 0, "path": path, "version": version, **({} if rc == 0 else {"error": out or str(rc)})}


def tun_status() -> dict:
    p = "/dev/net/tun"
    if not os.path.exists(p):
        return {"ok": False, "error": "%s does not exist" % p}
    if not os.access(p, os.R_OK | os.W_OK):
        return {"ok": False, "error": "%s is not readable and writable by uid %d (ask for mode 0666)"
                % (p, os.getuid())}
    return {"ok": True}


# ------------------------------------------------------------------ the probe
def probe(targets=(), *, timeout: float = 3.0) -> dict:
    """Probe this node's outbound access. `targets` are 'HOST:PORT' strings (or (host, port)).

    Returns a JSON-able dict: node, uid, dns (own name), targets (one dict each, in order),
    proxy (variables already set, credentials masked), userns, slirp4netns, tun, verdict and
    suggestion. Targets are probed in parallel; the whole probe takes about `timeout` seconds
    at most (plus the namespace test)."""
    t0 = time.monotonic()
    node = socket.gethostname()
    parsed = []
    for t in targets:
        parsed.append(tuple(t) if isinstance(t, (tuple, list)) else parse_target(t))
    rows = [None] * len(parsed)

    def one(i, host, port):
        try:
            rows[i] = connect(host, port, timeout)
        except Exception as e:   # a probe reports, it never raises
            rows[i] = {"target": "%s:%s" % (host, port), "status": "error", "error": repr(e)}
    threads = [threading.Thread(target=one, args=(i, h, p), daemon=True) for i, (h, p) in enumerate(parsed)]
    for th in threads:
        th.start()
    res = {"node": node, "uid": os.getuid(), "dns": {node: resolve(node, 0, timeout)},
           "proxy": proxy_variables(), "userns": userns_status(timeout), "slirp4netns": slirp_status(timeout),
           "tun": tun_status()}
    for th in threads:
        th.join(timeout * 2 + 1)
    res["targets"] = [r or {"target": "%s:%s" % parsed[i], "status": "timeout", "error": "probe thread hung"}
                      for i, r in enumerate(rows)]
    res["verdict"], res["suggestion"] = verdict(res)
    res["seconds"] = round(time.monotonic() - t0, 3)
    return res


def namespace_ready(res: dict) -> bool:
    return bool(res.get("userns", {}).get("ok") and res.get("slirp4netns", {}).get("ok")
                and res.get("tun", {}).get("ok"))


def verdict(res: dict) -> tuple:
    """(verdict, suggestion): verdict is direct | partial | no-direct-route | unknown."""
    ts = res.get("targets") or []
    ok = [t for t in ts if t.get("status") == "ok"]
    ns = namespace_ready(res)
    extra = ("; " + NS_HINT) if ns else ""
    proxy = [k for k in res.get("proxy", {}) if k.lower() != "no_proxy"]
    if proxy:
        extra += "; a site proxy is already set (%s): programs that honour it may work" % ", ".join(proxy)
    if not ts:
        return "unknown", ("no targets given (--target HOST:PORT) to test direct access; namespace mode %s"
                           % ("available" if ns else "unavailable")) + (extra if proxy else "")
    if len(ok) == len(ts):
        return "direct", "direct access works: no tunnel needed"
    failed = ", ".join("%s %s" % (t.get("target"), t.get("status")) for t in ts if t.get("status") != "ok")
    if not ok:
        return "no-direct-route", "no direct route (%s): %s%s" % (failed, TUNNEL_HINT, extra)
    return "partial", "some targets unreachable (%s): %s for them%s" % (failed, TUNNEL_HINT, extra)


# ------------------------------------------------------------------ rendering
def _cell_target(t):
    st = t.get("status", "?")
    return "%s %gms" % (st, t["ms"]) if st == "ok" and t.get("ms") is not None else st


def _cap(d, yes="yes"):
    return yes if d.get("ok") else "no"


def render_table(results: list) -> str:
    """One row per node: DNS of its own name, each target, proxy variables, namespace abilities,
    verdict; the distinct suggestions and errors follow the table."""
    targets = []
    for r in results:
        for t in r.get("targets") or []:
            if t.get("target") not in targets:
                targets.append(t.get("target"))
    head = ["NODE", "WORKER", "SELF-DNS"] + targets + ["PROXY", "USERNS", "SLIRP4NETNS", "TUN", "VERDICT"]
    rows, notes = [], []
    for r in results:
        node = str(r.get("node") or r.get("host") or "?")
        wid = "" if r.get("worker") is None else str(r.get("worker"))
        if r.get("error"):
            rows.append([node, wid, "-"] + ["-"] * len(targets) + ["-", "-", "-", "-", "error"])
            notes.append("%s: %s" % (node, r["error"]))
            continue
        own = next(iter((r.get("dns") or {}).values()), {})
        by = {t.get("target"): t for t in r.get("targets") or []}
        sl = r.get("slirp4netns") or {}
        rows.append([node, wid, "ok" if own.get("ok") else "FAIL"]
                    + [_cell_target(by[t]) if t in by else "-" for t in targets]
                    + [",".join(sorted({k.lower() for k in r.get("proxy") or {}})) or "-",
                       _cap(r.get("userns") or {}), (sl.get("version") or "yes") if sl.get("ok") else "no",
                       _cap(r.get("tun") or {}), r.get("verdict", "?")])
        for t in r.get("targets") or []:
            if t.get("status") != "ok" and t.get("error"):
                notes.append("%s: %s: %s" % (node, t.get("target"), t["error"]))
        for k in ("userns", "slirp4netns", "tun"):
            if (r.get(k) or {}).get("error"):
                notes.append("%s: %s: %s" % (node, k, r[k]["error"]))
        if r.get("suggestion"):
            notes.append("-> " + r["suggestion"])
    if not any(wid for _, wid, *_ in rows):
        head.pop(1)
        rows = [[row[0]] + row[2:] for row in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head] + rows]
    seen = set()
    for n in notes:
        if n not in seen:
            seen.add(n)
            lines.append(n)
    return "\n".join(lines) + "\n"


__all__ = ["probe", "render_table", "parse_target", "mask_credentials", "verdict"]
