"""`vinehpc net ns`: run a command in a new unprivileged user+network namespace whose only link is
slirp4netns (user-mode TCP/IP, MTU 65520), for programs that ignore proxy variables.

How it runs (no root, no setuid helper):
  1. `unshare --user --map-root-user --net [--mount] python -I _nschild.py ...` (no --fork: the
     command ends up with this very pid, so its exit status and signals are ours to handle);
  2. the child says "namespace exists" on a pipe; we start `slirp4netns --configure --mtu=65520
     --ready-fd --exit-fd PID tap0` and wait for its ready byte;
  3. we send the child its plan (resolv.conf, firewall); it applies it as root of the user
     namespace and execs the command (a close-on-exec status pipe tells us exec happened);
  4. signals we receive are forwarded; when the command exits, closing --exit-fd stops slirp.
Inside: tap0 10.0.2.100/24, gateway 10.0.2.2 = the host's loopback, DNS forwarder 10.0.2.3.

With a tunnel, the namespace's only way out is the proxy on the host's loopback, reached as
10.0.2.2:PORT: proxy variables point there, slirp's DNS is off, the default route is removed and
an nftables (else iptables) output policy rejects everything but loopback and the proxy port(s).
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

GATEWAY = "10.0.2.2"     # slirp: the host (its 127.0.0.1 unless --disable-host-loopback)
DNS = "10.0.2.3"         # slirp's DNS forwarder
MTU = 65520
CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_nschild.py")
INSTALL_HINT = "apt-get install slirp4netns uidmap (dnf install slirp4netns shadow-utils)"
FALLBACK = ("fallback: the proxy-variable tunnel, Manager(tunnel=True) / vinehpc run --tunnel, "
            "which needs neither namespaces nor slirp4netns")
PROXY_NAMES = ("ALL_PROXY", "HTTPS_PROXY", "HTTP_PROXY")
FORWARDED = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


class NsError(RuntimeError):
    """The namespace could not be set up (the message says why and what to do instead)."""


# ------------------------------------------------------------------ the tunnel's proxy
def _loopback(host):
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _retarget(url: str) -> tuple:
    """A proxy URL as seen from inside: loopback -> 10.0.2.2; a name -> its address (the namespace
    has no DNS). Returns (url, (ip, port))."""
    m = re.match(r"^([a-z0-9+.-]+://)?([^@/]*@)?(\[[^\]]+\]|[^:/]+)(?::(\d+))?(.*)$", url.strip(), re.I)
    if not m or not m.group(4):
        raise NsError("the tunnel's proxy must be SCHEME://HOST:PORT with an explicit port, got %r" % url)
    scheme, cred, host, port, rest = m.group(1) or "http://", m.group(2) or "", m.group(3).strip("[]"), \
        int(m.group(4)), m.group(5)
    if _loopback(host):
        ip = GATEWAY
    else:
        try:
            ip = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
        except OSError as e:
            raise NsError("cannot resolve the proxy host %r: %s" % (host, e)) from e
    return "%s%s%s:%d%s" % (scheme, cred, ip, port, rest), (ip, port)


def tunnel_env(spec, environ=None) -> tuple:
    """The proxy variables for inside the namespace, and the (ip, port) pairs they allow.

    spec: a PORT of a proxy on the host's loopback (SOCKS5 with remote DNS for ALL_PROXY, HTTP
    CONNECT for HTTP(S)_PROXY, on the same port); a proxy URL; or "env": the proxy variables
    already set (as Manager(tunnel=True) sets them for tasks), with loopback made 10.0.2.2."""
    env = os.environ if environ is None else environ
    spec = str(spec).strip()
    if spec.isdigit():
        port = int(spec)
        if not 0 < port < 65536:
            raise NsError("the tunnel port must be in 1..65535, got %s" % spec)
        urls = {"ALL_PROXY": "socks5h://%s:%d" % (GATEWAY, port), "HTTPS_PROXY": "http://%s:%d" % (GATEWAY, port),
                "HTTP_PROXY": "http://%s:%d" % (GATEWAY, port)}
    elif spec == "env":
        urls = {}
        for n in PROXY_NAMES:
            v = env.get(n) or env.get(n.lower())
            if v:
                urls[n] = v
        if not urls:
            raise NsError("--tunnel env: none of %s is set; run inside a task of Manager(tunnel=True), or give "
                          "the proxy as --tunnel PORT or --tunnel URL" % ", ".join(PROXY_NAMES))
    elif "://" in spec:
        urls = {n: spec for n in PROXY_NAMES}
    else:
        raise NsError("--tunnel takes a PORT, a proxy URL or 'env', got %r" % spec)
    out, allowed = {}, []
    for n, u in urls.items():
        u2, dest = _retarget(u)
        out[n] = out[n.lower()] = u2
        if dest not in allowed:
            allowed.append(dest)
    out["NO_PROXY"] = out["no_proxy"] = "localhost,127.0.0.1,::1"
    return out, allowed


# ------------------------------------------------------------------ the plan for the child
def firewall_steps(allowed, *, dns=False, tool=None) -> tuple:
    """Commands (run as root of the user namespace) that let out only loopback and `allowed`
    (ip, port) TCP destinations (+ slirp's DNS if `dns`). -> (steps, tool used or None)."""
    tool = tool or ("nft" if shutil.which("nft") else "iptables" if shutil.which("iptables") else None)
    steps = []
    if tool == "nft":
        rules = ['oifname "lo" accept']
        rules += ["ip daddr %s tcp dport %d accept" % (ip, port) for ip, port in allowed]
        if dns:
            rules.append("ip daddr %s meta l4proto { tcp, udp } th dport 53 accept" % DNS)
        rules += ["meta l4proto tcp reject with tcp reset", "reject"]
        text = ("table inet vinehpc_ns {\n  chain output {\n    type filter hook output priority 0; policy drop;\n"
                + "".join("    %s\n" % r for r in rules) + "  }\n}\n")
        steps.append({"argv": ["nft", "-f", "-"], "stdin": text, "what": "the nftables rules"})
    elif tool == "iptables":
        rules = [["-o", "lo", "-j", "ACCEPT"]]
        rules += [["-p", "tcp", "-d", ip, "--dport", str(port), "-j", "ACCEPT"] for ip, port in allowed]
        if dns:
            rules += [["-p", p, "-d", DNS, "--dport", "53", "-j", "ACCEPT"] for p in ("udp", "tcp")]
        rules += [["-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset"], ["-j", "REJECT"]]
        steps += [{"argv": ["iptables", "-A", "OUTPUT"] + r, "what": "an iptables rule"} for r in rules]
    return steps, tool


def plan(*, tunnel=None, dns=None, environ=None) -> dict:
    """What run() will do: {"env", "dns", "slirp_args", "unshare_args", "steps", "firewall",
    "warnings", "resolv_conf"(content or None)}. Pure apart from looking up tools on PATH."""
    env = dict(os.environ if environ is None else environ)
    dns = dns or ("none" if tunnel else "slirp")
    if dns not in ("slirp", "host", "none"):
        raise NsError("dns must be slirp, host or none, got %r" % dns)
    p = {"dns": dns, "slirp_args": [], "unshare_args": [], "steps": [], "firewall": None, "warnings": [],
         "resolv_conf": None}
    if dns == "none":
        p["slirp_args"].append("--disable-dns")
    elif dns == "slirp":
        # the host's resolv.conf may name 127.0.0.53 (its own loopback): point at slirp's forwarder,
        # in a private mount namespace so nothing outside changes
        p["unshare_args"].append("--mount")
        p["resolv_conf"] = "nameserver %s\n" % DNS
    if tunnel is not None:
        penv, allowed = tunnel_env(tunnel, env)
        env.update(penv)
        steps, tool = firewall_steps(allowed, dns=dns != "none")
        if shutil.which("ip"):
            steps.append({"argv": ["ip", "route", "del", "default"], "what": "removing the default route"})
        elif tool is None:
            raise NsError("--tunnel needs nft, iptables or ip inside the namespace to block direct traffic; none is "
                          "on PATH (apt-get install nftables)")
        if tool is None:
            p["warnings"].append("neither nft nor iptables is on PATH: direct traffic off this host is cut (no "
                                 "default route), but every port of the host's loopback stays reachable via %s"
                                 % GATEWAY)
        p["steps"], p["firewall"], p["allowed"] = steps, tool, allowed
    p["env"] = env
    return p


# ------------------------------------------------------------------ running
def check_tools(slirp="slirp4netns") -> tuple:
    """(unshare, slirp4netns) paths, or NsError naming the install command and the fallback."""
    unshare = shutil.which("unshare")
    if unshare is None:
        raise NsError("unshare (util-linux) is not on PATH; %s" % FALLBACK)
    path = shutil.which(slirp)
    if path is None:
        raise NsError("slirp4netns is not on PATH: install it (%s) or put it on PATH; %s" % (INSTALL_HINT, FALLBACK))
    return unshare, path


def _read_until(fd, deadline):
    """The first chunk read from fd (b"" at EOF), or None on timeout."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        r, _, _ = select.select([fd], [], [], min(left, 0.2))
        if r:
            return os.read(fd, 4096)


def _interactive_pgrp():
    """True when our process group is the terminal's foreground: the terminal then already sends
    SIGINT/SIGQUIT to the command (same group), and relaying them would deliver them twice."""
    try:
        fd = os.open("/dev/tty", os.O_RDONLY)
    except OSError:
        return False
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(fd)


def run(cmd, *, tunnel=None, dns=None, mtu: int = MTU, slirp: str = "slirp4netns",
        ready_timeout: float = 15.0, stderr=None) -> int:
    """Run `cmd` (a list) in a new user+network namespace connected by slirp4netns; returns its
    exit status (128+N if killed by signal N). Raises NsError when the namespace cannot be set up.

    tunnel: None, a PORT, a proxy URL or "env" (see tunnel_env). dns: slirp (resolv.conf points
    at slirp's forwarder; default without tunnel), host (the host's resolv.conf as is) or none
    (slirp's DNS off; default with tunnel)."""
    if not cmd:
        raise NsError("no command given (vinehpc net ns [options] -- CMD ...)")
    err = stderr or sys.stderr
    unshare, slirp_path = check_tools(slirp)
    p = plan(tunnel=tunnel, dns=dns)
    for w in p["warnings"]:
        print("vinehpc net ns: warning: %s" % w, file=err)
    tmpdir = tempfile.mkdtemp(prefix="vinehpc-ns-")
    resolv = None
    if p["resolv_conf"]:
        resolv = os.path.join(tmpdir, "resolv.conf")
        with open(resolv, "w") as f:
            f.write(p["resolv_conf"])
        os.chmod(resolv, 0o644)
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    st_r, st_w = os.pipe()
    child = slirp_proc = exit_w = None
    fwd = {}
    try:
        argv = [unshare, "--user", "--map-root-user", "--net", *p["unshare_args"], sys.executable, "-I", CHILD,
                str(os.getpid()), str(ready_w), str(go_r), str(st_w), "--", *cmd]
        child = subprocess.Popen(argv, pass_fds=(ready_w, go_r, st_w), env=p["env"])
        for fd in (ready_w, go_r, st_w):
            os.close(fd)
        ready_w = go_r = st_w = None
        # forward signals from now on (the command has our pid's child's pid for its whole life)
        if threading.current_thread() is threading.main_thread():
            skip = (signal.SIGINT, signal.SIGQUIT) if _interactive_pgrp() else ()
            for s in FORWARDED:
                if s not in skip:
                    fwd[s] = signal.signal(s, lambda n, _f: child.poll() is None and os.kill(child.pid, n))
        deadline = time.monotonic() + ready_timeout
        got = _read_until(ready_r, deadline)
        if not got:
            rc = _reap(child, 5)
            raise NsError("could not create a user+network namespace (unshare exited %s%s). Unprivileged user "
                          "namespaces may be disabled: see sysctl user.max_user_namespaces, "
                          "kernel.unprivileged_userns_clone, kernel.apparmor_restrict_unprivileged_userns "
                          "(vinehpc net probe checks them); %s"
                          % (rc, "" if got is not None else ", no answer within %g s" % ready_timeout, FALLBACK))
        # slirp4netns: --ready-fd says "configured", --exit-fd (its read end) stops it on close
        sr, sw = os.pipe()
        exit_r, exit_w = os.pipe()
        log = tempfile.TemporaryFile(dir=tmpdir)
        slirp_proc = subprocess.Popen([slirp_path, "--configure", "--mtu=%d" % mtu, "--ready-fd=%d" % sw,
                                       "--exit-fd=%d" % exit_r, *p["slirp_args"], str(child.pid), "tap0"],
                                      pass_fds=(sw, exit_r), stdin=subprocess.DEVNULL, stdout=log,
                                      stderr=subprocess.STDOUT)
        os.close(sw)
        os.close(exit_r)
        got = _read_until(sr, deadline)
        os.close(sr)
        if not got:
            if slirp_proc.poll() is None:
                slirp_proc.kill()
            slirp_proc.wait()
            log.seek(0)
            out = log.read().decode(errors="replace").strip()
            hint = ""
            if "/dev/net/tun" in out:
                hint = " /dev/net/tun must be readable and writable by you (an admin: chmod 0666 /dev/net/tun)."
            raise NsError("slirp4netns did not come up (%s): %s.%s %s"
                          % ("exit code %s" % slirp_proc.returncode if got is not None else
                             "no ready signal within %g s" % ready_timeout,
                             out.splitlines()[-1] if out else "no output", hint, FALLBACK))
        os.write(go_w, json.dumps({"resolv_conf": resolv, "steps": p["steps"]}).encode())
        os.close(go_w)
        go_w = None
        status = b""
        while True:
            chunk = os.read(st_r, 4096)
            if not chunk:
                break
            status += chunk
        if status:
            rc = _reap(child, 5)
            msg = status.decode(errors="replace").strip()
            if msg.startswith("cannot run"):
                print("vinehpc net ns: %s" % msg, file=err)
                return rc if rc and rc > 0 else 127
            raise NsError(msg)
        rc = child.wait()
        return 128 - rc if rc < 0 else rc
    finally:
        for s, h in fwd.items():
            signal.signal(s, h)
        for fd in (ready_r, ready_w, go_r, go_w, st_r, st_w):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()
        if exit_w is not None:
            os.close(exit_w)
        if slirp_proc is not None:
            _reap(slirp_proc, 5)
        shutil.rmtree(tmpdir, ignore_errors=True)


def _reap(proc, timeout):
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


__all__ = ["run", "plan", "tunnel_env", "firewall_steps", "check_tools", "NsError"]
