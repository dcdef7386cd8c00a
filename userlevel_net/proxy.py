"""The worker side of the tunnel: a local SOCKS5 + HTTP proxy on 127.0.0.1.

One port serves both (the first byte tells: 0x05 is SOCKS5, anything else HTTP):

* SOCKS5 (RFC 1928) CONNECT with IPv4, IPv6 or a domain name (the name is resolved at the
  egress: socks5h://), username/password authentication (RFC 1929) only;
* HTTP: CONNECT host:port, and absolute-form requests (GET http://host/path ...), which are
  forwarded in origin form with "Connection: close" (one request per client connection);
  Proxy-Authorization: Basic, else 407.

Every client stream becomes its own TCP connection to the egress (see _relay), so one slow
or failing stream never holds up another, and TCP flow control stays end to end.

    p = start_proxy("head:9200", secret)          # its own process (python -m userlevel_net.proxy)
    subprocess.run(cmd, env={**os.environ, **p.env})
    p.stop()

The secret and the per-proxy credentials reach the child process on its stdin (never argv
or the environment); it prints {"port": N} on stdout and exits when its stdin closes
(stop(), or the parent dying).
"""
from __future__ import annotations

import base64
import hmac
import json
import logging
import os
import secrets
import select
import socket
import struct
import subprocess
import sys
import threading
from urllib.parse import urlsplit

from ._relay import CONNECT_TIMEOUT, StreamError, open_stream, parse_hostport, relay

log = logging.getLogger("vinehpc.tunnel.proxy")

REQUEST_TIMEOUT = 30.0     # a client has this long to finish its SOCKS/HTTP request
MAX_HEAD = 64 << 10
LOCAL_NO_PROXY = ["localhost", "127.0.0.1", "::1"]

# StreamError kind -> SOCKS5 reply code / HTTP status
SOCKS_REPLY = {"denied": 0x02, "refused": 0x05, "timeout": 0x06, "dns": 0x01, "failed": 0x01}
HTTP_STATUS = {"denied": (403, "Forbidden"), "timeout": (504, "Gateway Timeout")}


def socks_code(e: StreamError) -> int:
    if e.kind == "unreachable":
        import errno as _e
        return 0x03 if e.errno in (_e.ENETUNREACH, _e.ENETDOWN) else 0x04
    return SOCKS_REPLY.get(e.kind, 0x01)


class ProxyServer:
    """The proxy itself (threads). Used inside the child process, or in-process for tests."""

    def __init__(self, egress: tuple, secret: str, user: str, password: str, *, host: str = "127.0.0.1",
                 port: int = 0, connect_timeout: float = CONNECT_TIMEOUT):
        self.egress = egress
        self.secret = secret
        self.user = user.encode()
        self.password = password.encode()
        self.connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self.stats = dict(clients=0, opened=0, failed=0, auth_failed=0)
        self._clients = set()
        self._stopping = False
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
            s.listen(1024)
        except BaseException:
            s.close()
            raise
        self.sock = s
        self.port = s.getsockname()[1]
        self._thread = None

    def start(self) -> "ProxyServer":
        self._thread = threading.Thread(target=self.serve_forever, name="proxy-accept", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self):
        while not self._stopping:
            try:
                c, _ = self.sock.accept()
            except OSError:
                if self._stopping:
                    return
                threading.Event().wait(0.05)
                continue
            with self._lock:
                self._clients.add(c)
                self.stats["clients"] += 1
            try:
                threading.Thread(target=self._client, args=(c,), name="proxy-client", daemon=True).start()
            except RuntimeError:
                self._drop(c)

    def stop(self):
        self._stopping = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        with self._lock:
            cs = list(self._clients)
        for c in cs:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _drop(self, c):
        with self._lock:
            self._clients.discard(c)
        c.close()

    def _count(self, k):
        with self._lock:
            self.stats[k] += 1

    def _creds_ok(self, user: bytes, password: bytes) -> bool:
        # both compared, always (no early exit that would tell which one was wrong)
        a = hmac.compare_digest(user, self.user)
        b = hmac.compare_digest(password, self.password)
        return a and b

    def _open(self, host, port):
        """(egress socket, leftover) or raises StreamError."""
        try:
            s = open_stream(self.egress, self.secret, host, port, connect_timeout=self.connect_timeout)
        except StreamError as e:
            self._count("failed")
            log.info("stream to %s:%d: %s", host, port, e)
            raise
        with self._lock:
            self._clients.add(s[0])
            self.stats["opened"] += 1
        return s

    # ------------------------------------------------------------------------- clients
    def _client(self, c):
        e_sock = None
        try:
            c.settimeout(REQUEST_TIMEOUT)
            first = c.recv(1, socket.MSG_PEEK)
            if not first:
                return
            if first[0] == 5:
                e_sock = self._socks5(c)
            else:
                e_sock = self._http(c)
        except (OSError, ValueError, UnicodeError) as e:
            log.debug("client: %s", e)
        except Exception:
            log.exception("client")
        finally:
            self._drop(c)
            if e_sock is not None:
                self._drop(e_sock)

    # SOCKS5 ----------------------------------------------------------------------------
    def _socks5(self, c):
        ver, n = _recv_exact(c, 2)
        methods = _recv_exact(c, n)
        if 2 not in methods:
            c.sendall(b"\x05\xff")          # no acceptable method: we require user/password
            self._count("auth_failed")
            return None
        c.sendall(b"\x05\x02")
        sub_ver, ulen = _recv_exact(c, 2)
        user = _recv_exact(c, ulen)
        (plen,) = _recv_exact(c, 1)
        password = _recv_exact(c, plen)
        if sub_ver != 1 or not self._creds_ok(user, password):
            c.sendall(b"\x01\x01")
            self._count("auth_failed")
            log.info("SOCKS5 client: wrong credentials")
            return None
        c.sendall(b"\x01\x00")
        ver, cmd, _, atyp = _recv_exact(c, 4)
        if atyp == 1:
            host = socket.inet_ntop(socket.AF_INET, _recv_exact(c, 4))
        elif atyp == 4:
            host = socket.inet_ntop(socket.AF_INET6, _recv_exact(c, 16))
        elif atyp == 3:
            (ln,) = _recv_exact(c, 1)
            host = _recv_exact(c, ln).decode("utf-8")    # the egress resolves it (remote DNS)
        else:
            c.sendall(_socks_reply(0x08))
            return None
        (port,) = struct.unpack("!H", _recv_exact(c, 2))
        if ver != 5 or cmd != 1:            # only CONNECT (no BIND, no UDP ASSOCIATE)
            c.sendall(_socks_reply(0x07))
            return None
        try:
            s, leftover = self._open(host, port)
        except StreamError as e:
            c.sendall(_socks_reply(socks_code(e)))
            return None
        c.sendall(_socks_reply(0))
        relay(c, s, b"", leftover)
        return s

    # HTTP ------------------------------------------------------------------------------
    def _http(self, c):
        buf = b""
        while b"\r\n\r\n" not in buf:
            if len(buf) > MAX_HEAD:
                _http_error(c, 431, "Request Header Fields Too Large", "request head too large")
                return None
            b = c.recv(65536)
            if not b:
                return None
            buf += b
        head, _, body = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        try:
            method, target, version = lines[0].split(" ")
        except ValueError:
            _http_error(c, 400, "Bad Request", "malformed request line")
            return None
        headers = []
        for ln in lines[1:]:
            k, sep, v = ln.partition(":")
            if not sep:
                _http_error(c, 400, "Bad Request", "malformed header")
                return None
            headers.append((k.strip(), v.strip()))
        if not self._http_auth([v for k, v in headers if k.lower() == "proxy-authorization"]):
            self._count("auth_failed")
            log.info("HTTP client: missing or wrong proxy credentials")
            c.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                      b"Proxy-Authenticate: Basic realm=\"vinehpc tunnel\"\r\n"
                      b"Content-Length: 0\r\nConnection: close\r\n\r\n")
            return None
        if method.upper() == "CONNECT":
            try:
                host, port = parse_hostport(target)
            except ValueError:
                _http_error(c, 400, "Bad Request", "CONNECT target must be host:port")
                return None
            try:
                s, leftover = self._open(host, port)
            except StreamError as e:
                _http_stream_error(c, e)
                return None
            c.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            relay(c, s, body, leftover)
            return s
        # absolute-form request: forward it in origin form, one request per connection
        u = urlsplit(target)
        if u.scheme.lower() != "http" or not u.hostname:
            _http_error(c, 400, "Bad Request",
                        "only http://... absolute URLs and CONNECT are supported (use CONNECT for https)")
            return None
        host, port = u.hostname, u.port or 80
        path = u.path or "/"
        if u.query:
            path += "?" + u.query
        drop = {"proxy-authorization", "proxy-connection", "connection", "keep-alive"}
        out = ["%s %s %s" % (method, path, version)]
        have_host = False
        for k, v in headers:
            kl = k.lower()
            if kl in drop:
                continue
            have_host |= kl == "host"
            out.append("%s: %s" % (k, v))
        if not have_host:
            out.append("Host: %s" % u.netloc.rpartition("@")[2])
        out.append("Connection: close")
        try:
            s, leftover = self._open(host, port)
        except StreamError as e:
            _http_stream_error(c, e)
            return None
        relay(c, s, ("\r\n".join(out) + "\r\n\r\n").encode("latin-1") + body, leftover)
        return s

    def _http_auth(self, values) -> bool:
        for v in values:
            scheme, _, cred = v.partition(" ")
            if scheme.lower() != "basic":
                continue
            try:
                user, _, password = base64.b64decode(cred.strip(), validate=True).partition(b":")
            except ValueError:
                continue
            if self._creds_ok(user, password):
                return True
        return False


def _recv_exact(c, n) -> bytes:
    out = b""
    while len(out) < n:
        b = c.recv(n - len(out))
        if not b:
            raise ConnectionError("client closed the connection")
        out += b
    return out


def _socks_reply(code: int) -> bytes:
    return bytes([5, code, 0, 1, 0, 0, 0, 0, 0, 0])


def _http_error(c, status, reason, detail):
    body = (detail + "\n").encode("utf-8", "replace")
    c.sendall(b"HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
              % (status, reason.encode(), len(body)) + body)


def _http_stream_error(c, e: StreamError):
    status, reason = HTTP_STATUS.get(e.kind, (502, "Bad Gateway"))
    _http_error(c, status, reason, "vinehpc tunnel: %s" % e)


# ------------------------------------------------------------------------------ the handle
def _env(user, password, port, no_proxy) -> dict:
    cred = "%s:%s@127.0.0.1:%d" % (user, password, port)
    np_ = ",".join(dict.fromkeys(LOCAL_NO_PROXY + [h for h in no_proxy if h]))
    env = {}
    for k, v in (("ALL_PROXY", "socks5h://" + cred), ("HTTPS_PROXY", "http://" + cred),
                 ("HTTP_PROXY", "http://" + cred), ("NO_PROXY", np_)):
        env[k] = env[k.lower()] = v
    return env


class Proxy:
    """A running local proxy: port, env (for tasks), pid (None in-process), stop()."""

    def __init__(self, port: int, env: dict, proc=None, server=None):
        self.port = port
        self.env = env
        self._proc = proc
        self._server = server
        self.pid = proc.pid if proc is not None else None

    def alive(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return self._server is not None and not self._server._stopping

    def stop(self, timeout: float = 5.0) -> None:
        if self._server is not None:
            self._server.stop()
        p = self._proc
        if p is None:
            return
        try:
            p.stdin.close()           # the child exits when its stdin closes
        except OSError:
            pass
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        if p.stdout is not None:
            p.stdout.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def start_proxy(egress: str, secret: str, *, no_proxy=(), log=None, in_process: bool = False,
                port: int = 0, connect_timeout: float = CONNECT_TIMEOUT, startup_timeout: float = 30.0) -> Proxy:
    """Start a local proxy relaying to the egress at "HOST:PORT"; returns a Proxy.

    By default it runs in its own process (python -m userlevel_net.proxy), isolated from the
    caller's loop.  log: where that process's log goes -- None (inherit our stderr), a path
    (appended to), or an open file.  in_process=True runs it on threads of this process."""
    eg = parse_hostport(egress)
    if not secret:
        raise ValueError("start_proxy needs the run's secret")
    user = "vh" + secrets.token_hex(6)
    password = secrets.token_urlsafe(24)
    if in_process:
        srv = ProxyServer(eg, secret, user, password, port=port, connect_timeout=connect_timeout).start()
        return Proxy(srv.port, _env(user, password, srv.port, list(no_proxy)), server=srv)
    close_log = None
    if log is None:
        err = None
    elif isinstance(log, (str, os.PathLike)):
        err = close_log = open(log, "ab")
    else:
        err = log
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("VINEHPC_SECRET", None)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "userlevel_net.proxy"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err, env=env, close_fds=True)
    finally:
        if close_log is not None:
            close_log.close()
    try:
        proc.stdin.write((json.dumps({"egress": "%s:%d" % eg if ":" not in eg[0] else "[%s]:%d" % eg,
                                      "secret": secret, "user": user, "password": password, "port": port,
                                      "connect_timeout": connect_timeout}) + "\n").encode())
        proc.stdin.flush()
        r, _, _ = select.select([proc.stdout], [], [], startup_timeout)
        line = proc.stdout.readline() if r else b""
        try:
            got = json.loads(line)
            pport = int(got["port"])
        except (ValueError, KeyError, TypeError):
            raise RuntimeError("the tunnel proxy did not start (exit code %s; see its log): %r"
                               % (proc.poll(), line[:200])) from None
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return Proxy(pport, _env(user, password, pport, list(no_proxy)), proc=proc)


def _child_main() -> int:
    logging.basicConfig(level=os.environ.get("VINEHPC_TUNNEL_LOGLEVEL", "INFO"),
                        format="%(asctime)s tunnel-proxy[%(process)d] %(levelname)s %(message)s")
    cfg = json.loads(sys.stdin.buffer.readline())
    srv = ProxyServer(parse_hostport(cfg["egress"]), cfg["secret"], cfg["user"], cfg["password"],
                      port=int(cfg.get("port") or 0), connect_timeout=float(cfg.get("connect_timeout") or CONNECT_TIMEOUT))
    del cfg
    srv.start()
    sys.stdout.write(json.dumps({"port": srv.port}) + "\n")
    sys.stdout.flush()
    log.info("proxy on 127.0.0.1:%d -> egress %s:%d", srv.port, *srv.egress)
    # live until our stdin closes (stop(), or the parent died)
    while sys.stdin.buffer.read(65536):
        pass
    srv.stop()
    log.info("proxy stopped: %s", srv.stats)
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
