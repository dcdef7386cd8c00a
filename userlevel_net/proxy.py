"""The worker side of the tunnel: a local SOCKS5 + HTTP proxy on 127.0.0.1.

One port serves both (the first byte tells: 0x05 is SOCKS5, anything else HTTP):

* SOCKS5 (RFC 1928) CONNECT with IPv4, IPv6 or a domain name (the name is resolved at the
  egress: socks5h://), username/password authentication (RFC 1929) only;
* HTTP: CONNECT host:port, and absolute-form requests (GET http://host/path ...), which are
  forwarded in origin form with "Connection: close" (one request per client connection);
  Proxy-Authorization: Basic, else 407.

Every client stream becomes its own TCP connection to the egress (see _relay), so one slow
or failing stream never holds up another, and TCP flow control stays end to end.  The
proxy is one event-loop thread: no thread per client, bytes moved by splice(2).

    p = start_proxy("head:9200", secret)          # its own process (python -m userlevel_net.proxy)
    subprocess.run(cmd, env={**os.environ, **p.env})
    p.stop()

The secret and the per-proxy credentials reach the child process on its stdin (never argv
or the environment); it prints {"port": N} on stdout and exits when its stdin closes
(stop(), or the parent dying).
"""
from __future__ import annotations

import asyncio
import base64
import collections
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
from urllib.parse import urlsplit

from . import config
from ._relay import (CONNECT_TIMEOUT, READY_MAX_AGE, Deadline, LoopThread, Reader, Relay, StaleConn, StreamError,
                     alive, egress_connect, egress_request, listener, literal_addrinfo, parse_hostport, tune)

log = logging.getLogger("vinehpc.tunnel.proxy")

REQUEST_TIMEOUT = 30.0     # a client has this long to finish its SOCKS/HTTP request
MAX_HEAD = 64 << 10
READY = 2                  # connections to the egress kept ready (hello received) while streams are used
READY_IDLE = 60.0          # ... for this long after the last stream opened
REFILL_DELAY = 0.002      # ... replaced this long after one is used (when this stream is under way)
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
    """The proxy itself: one asyncio event-loop thread (see _relay).  Used inside the child
    process, or in-process for tests."""

    def __init__(self, egress: tuple, secret: str, user: str, password: str, *, host: str = "127.0.0.1",
                 port: int = 0, connect_timeout: float = CONNECT_TIMEOUT):
        self.egress = egress
        self.secret = secret
        self.user = user.encode()
        self.password = password.encode()
        self.connect_timeout = connect_timeout
        self.stats = dict(clients=0, opened=0, failed=0, auth_failed=0)
        self._stopping = False
        self._tasks = set()
        self._relays = set()
        self._egress_addrs = None
        self._ready = collections.deque()      # EgressConn, oldest first
        self._filling = 0
        self._last_open = None
        self._tick_handle = None
        self.sock = listener(host, port, defer_accept=True)   # SOCKS and HTTP clients speak first
        self.port = self.sock.getsockname()[1]
        self._lt = None

    def start(self) -> "ProxyServer":
        self._lt = LoopThread("proxy").start()
        self._lt.call(self._lt.loop.add_reader, self.sock.fileno(), self._on_accept)
        return self

    def stop(self):
        self._stopping = True
        lt, self._lt = self._lt, None
        if lt is None:
            self.sock.close()
        else:
            lt.shut(self._shutdown)

    def _shutdown(self):
        asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        while self._ready:
            self._ready.popleft().sock.close()
        for r in list(self._relays):
            r.stop()
        for t in list(self._tasks):
            t.cancel()

    def _creds_ok(self, user: bytes, password: bytes) -> bool:
        # both compared, always (no early exit that would tell which one was wrong)
        a = hmac.compare_digest(user, self.user)
        b = hmac.compare_digest(password, self.password)
        return a and b

    def _on_accept(self):
        loop = asyncio.get_running_loop()
        for _ in range(64):
            try:
                c, _ = self.sock.accept()
            except BlockingIOError:
                return
            except OSError as e:
                log.warning("accept: %s; backing off", e)
                loop.remove_reader(self.sock.fileno())
                loop.call_later(0.05, self._resume_accept)
                return
            self.stats["clients"] += 1
            c.setblocking(False)
            tune(c)
            t = loop.create_task(self._client(c))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    def _resume_accept(self):
        if not self._stopping:
            asyncio.get_running_loop().add_reader(self.sock.fileno(), self._on_accept)

    async def _egress_addresses(self, loop):
        if self._egress_addrs is None:
            host, port = self.egress
            addrs = literal_addrinfo(host, port)
            if addrs is None:
                try:
                    addrs = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                except (OSError, UnicodeError) as e:
                    raise StreamError("failed", "cannot resolve the egress's host %s: %s" % (host, e))
            self._egress_addrs = addrs
        return self._egress_addrs

    async def _open(self, loop, dl, host, port, early=b""):
        """(egress socket, leftover) or raises StreamError.  early: see egress_request."""
        try:
            try:
                ec = self._take(loop)
                if ec is not None:
                    try:
                        s = await egress_request(loop, ec, host, port, dl, early=early)
                    except StaleConn:
                        ec = None
                if ec is None:
                    ec = await egress_connect(loop, self.secret, await self._egress_addresses(loop), dl,
                                              connect_timeout=self.connect_timeout)
                    try:
                        s = await egress_request(loop, ec, host, port, dl, early=early)
                    except StaleConn:
                        raise StreamError("failed", "the egress at %s closed the connection during the "
                                                    "handshake (wrong secret?)" % ec.where) from None
            finally:
                self._last_open = loop.time()
                loop.call_later(REFILL_DELAY, self._refill, loop)   # off the path of this stream
        except StreamError as e:
            self.stats["failed"] += 1
            if e.kind == "failed" and "egress" in str(e):
                self._egress_addrs = None       # resolve the egress afresh next time
            log.info("stream to %s:%d: %s", host, port, e)
            raise
        self.stats["opened"] += 1
        return s

    # ready connections -----------------------------------------------------------------
    def _take(self, loop):
        now = loop.time()
        while self._ready:
            ec = self._ready.popleft()
            if now - ec.since < READY_MAX_AGE and alive(ec.sock):
                return ec
            ec.sock.close()
        return None

    def _refill(self, loop):
        while not self._stopping and len(self._ready) + self._filling < READY:
            self._filling += 1
            t = loop.create_task(self._fill_one(loop))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)
        if self._tick_handle is None and not self._stopping:
            self._tick_handle = loop.call_later(READY_MAX_AGE / 4, self._tick, loop)

    async def _fill_one(self, loop):
        try:
            ec = await egress_connect(loop, self.secret, await self._egress_addresses(loop), Deadline(loop),
                                      connect_timeout=self.connect_timeout)
        except StreamError as e:
            log.debug("cannot get a ready connection to the egress: %s", e)  # the next stream will say
        except asyncio.CancelledError:
            pass
        else:
            if self._stopping:
                ec.sock.close()
            else:
                self._ready.append(ec)
        finally:
            self._filling -= 1

    def _tick(self, loop):
        """Replace ready connections before the egress gives up on them; stop when idle."""
        self._tick_handle = None
        now = loop.time()
        while self._ready and now - self._ready[0].since > READY_MAX_AGE / 2:
            self._ready.popleft().sock.close()
        if self._last_open is not None and now - self._last_open < READY_IDLE:
            self._refill(loop)
        else:
            while self._ready:
                self._ready.popleft().sock.close()

    def _relay(self, loop, c, s, c_first, s_first, discard=False):
        r = None

        def closed(_out, _back):
            self._relays.discard(r)
        r = Relay(loop, c, s, c_first, s_first, on_close=closed, discard_a_to_b=discard)
        if not r.closed:
            self._relays.add(r)

    # ------------------------------------------------------------------------- clients
    async def _client(self, c):
        loop = asyncio.get_running_loop()
        dl = Deadline(loop)
        dl.set(REQUEST_TIMEOUT, "request")
        rd = Reader(loop, c)
        handed_over = False
        try:
            await rd.fill()
            if rd.buf[0] == 5:
                handed_over = await self._socks5(loop, dl, c, rd)
            else:
                handed_over = await self._http(loop, dl, c, rd)
        except (OSError, ValueError, UnicodeError) as e:
            log.debug("client: %s", e)
        except asyncio.CancelledError:
            if dl.fired:
                log.info("client: no complete request within %.0f s; closed", REQUEST_TIMEOUT)
        except Exception:
            log.exception("client")
        finally:
            dl.clear()
            if not handed_over:
                c.close()

    # SOCKS5 ----------------------------------------------------------------------------
    async def _socks5(self, loop, dl, c, rd) -> bool:
        ver, n = await rd.exact(2)
        methods = await rd.exact(n)
        if 2 not in methods:
            await rd.send(b"\x05\xff")      # no acceptable method: we require user/password
            self.stats["auth_failed"] += 1
            return False
        rd.put(b"\x05\x02")    # sent when we wait for more, or with the next reply
        sub_ver, ulen = await rd.exact(2)
        user = await rd.exact(ulen)
        (plen,) = await rd.exact(1)
        password = await rd.exact(plen)
        if sub_ver != 1 or not self._creds_ok(user, password):
            await rd.send(b"\x01\x01")
            self.stats["auth_failed"] += 1
            log.info("SOCKS5 client: wrong credentials")
            return False
        rd.put(b"\x01\x00")
        ver, cmd, _, atyp = await rd.exact(4)
        if atyp == 1:
            host = socket.inet_ntop(socket.AF_INET, await rd.exact(4))
        elif atyp == 4:
            host = socket.inet_ntop(socket.AF_INET6, await rd.exact(16))
        elif atyp == 3:
            (ln,) = await rd.exact(1)
            host = (await rd.exact(ln)).decode("utf-8")    # the egress resolves it (remote DNS)
        else:
            await rd.send(_socks_reply(0x08))
            return False
        (port,) = struct.unpack("!H", await rd.exact(2))
        if ver != 5 or cmd != 1:            # only CONNECT (no BIND, no UDP ASSOCIATE)
            await rd.send(_socks_reply(0x07))
            return False
        if not host or port == 0:
            await rd.send(_socks_reply(0x01))
            return False
        try:
            s, leftover = await self._open(loop, dl, host, port)
        except StreamError as e:
            await rd.send(_socks_reply(socks_code(e)))
            return False
        try:
            await rd.send(_socks_reply(0))
        except BaseException:
            s.close()
            raise
        self._relay(loop, c, s, bytes(rd.buf), leftover)
        return True

    # HTTP ------------------------------------------------------------------------------
    async def _http(self, loop, dl, c, rd) -> bool:
        raw = await rd.until(b"\r\n\r\n", MAX_HEAD)
        if raw is None:
            await _http_error(loop, c, 431, "Request Header Fields Too Large", "request head too large")
            return False
        body = bytes(rd.buf)
        lines = raw[:-4].decode("latin-1").split("\r\n")
        try:
            method, target, version = lines[0].split(" ")
        except ValueError:
            await _http_error(loop, c, 400, "Bad Request", "malformed request line")
            return False
        headers = []
        for ln in lines[1:]:
            k, sep, v = ln.partition(":")
            if not sep:
                await _http_error(loop, c, 400, "Bad Request", "malformed header")
                return False
            headers.append((k.strip(), v.strip()))
        if not self._http_auth([v for k, v in headers if k.lower() == "proxy-authorization"]):
            self.stats["auth_failed"] += 1
            log.info("HTTP client: missing or wrong proxy credentials")
            await loop.sock_sendall(c, b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                                       b"Proxy-Authenticate: Basic realm=\"vinehpc tunnel\"\r\n"
                                       b"Content-Length: 0\r\nConnection: close\r\n\r\n")
            return False
        if method.upper() == "CONNECT":
            try:
                host, port = parse_hostport(target)
                if not host or len(host) > 255 or port == 0:
                    raise ValueError(target)
            except ValueError:
                await _http_error(loop, c, 400, "Bad Request", "CONNECT target must be host:port")
                return False
            try:
                s, leftover = await self._open(loop, dl, host, port)
            except StreamError as e:
                await _http_stream_error(loop, c, e)
                return False
            try:
                await loop.sock_sendall(c, b"HTTP/1.1 200 Connection established\r\n\r\n")
            except BaseException:
                s.close()
                raise
            self._relay(loop, c, s, body, leftover)
            return True
        # absolute-form request: forward it in origin form, one request per connection
        u = urlsplit(target)
        if u.scheme.lower() != "http" or not u.hostname:
            await _http_error(loop, c, 400, "Bad Request",
                              "only http://... absolute URLs and CONNECT are supported (use CONNECT for https)")
            return False
        try:
            host, port = u.hostname, u.port or 80
        except ValueError:
            await _http_error(loop, c, 400, "Bad Request", "bad port in %s" % target[:200])
            return False
        if len(host) > 255:
            await _http_error(loop, c, 400, "Bad Request", "host name too long")
            return False
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
        # One request per connection ("Connection: close" to the origin): once the request and its
        # body (by Content-Length) are complete, whatever else the client sends (a second request,
        # with its Proxy-Authorization) is dropped, not passed to the origin. A body that is still
        # coming, or chunked, is relayed as it comes.
        clen = next((v.strip() for k, v in headers if k.lower() == "content-length"), "0") or "0"
        complete = (not any(k.lower() == "transfer-encoding" for k, _ in headers) and clen.isdigit()
                    and len(body) >= int(clen))
        if complete:
            body = body[:int(clen)]
        request = ("\r\n".join(out) + "\r\n\r\n").encode("latin-1") + body
        try:       # the request travels with the stream request: no round trip waits for it
            s, leftover = await self._open(loop, dl, host, port, early=request)
        except StreamError as e:
            await _http_stream_error(loop, c, e)
            return False
        self._relay(loop, c, s, b"", leftover, discard=complete)
        return True

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


def _socks_reply(code: int) -> bytes:
    return bytes([5, code, 0, 1, 0, 0, 0, 0, 0, 0])


async def _http_error(loop, c, status, reason, detail):
    body = (detail + "\n").encode("utf-8", "replace")
    await loop.sock_sendall(c, b"HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                               b"Connection: close\r\n\r\n" % (status, reason.encode(), len(body)) + body)


async def _http_stream_error(loop, c, e: StreamError):
    status, reason = HTTP_STATUS.get(e.kind, (502, "Bad Gateway"))
    await _http_error(loop, c, status, reason, "vinehpc tunnel: %s" % e)


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
        po = select.poll()              # (not select(): a busy worker may hold descriptors >= 1024)
        po.register(proc.stdout, select.POLLIN)
        line = proc.stdout.readline() if po.poll(startup_timeout * 1000) else b""
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
    logging.basicConfig(level=config.tunnel_loglevel(),
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
