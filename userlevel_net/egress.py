"""The egress: the side of the tunnel that has the network (the manager's node or a gateway).

Every stream is its own TCP connection from a worker's proxy.  The egress proves and checks
the run's secret (see _relay's docstring for the handshake), enforces the allow list,
resolves the destination's name itself (remote DNS), connects, and then relays raw bytes.
One thread: an asyncio event loop accepts, runs every handshake as a coroutine and relays
every open stream with non-blocking splice(2) (no copy through Python, no thread per stream;
see _relay).  Inside a Manager, that thread is the only one the tunnel adds.

    eg = Egress(secret, host="0.0.0.0", port=0, allow=["*.cern.ch:1094", "10.0.0.0/8"]).start()
    eg.port, eg.stats
    eg.stop()

Allow patterns (default: allow all): HOST, HOST:PORT, HOST:LO-HI, HOST:*, [V6]:PORT, where
HOST is a shell glob or a CIDR network (10.0.0.0/8, fd00::/8).  A glob that can only spell an
address (digits, dots and wildcards: `10.9.8.*`, `*`; with a colon, hex digits too: `fd00::*`)
is an *address* pattern, matched against the addresses the destination resolves to and never
against the requested name (else `10.9.8.*` would allow `10.9.8.1.evil.test`, which resolves
anywhere); any other glob is a *name* pattern, matched (case-insensitively) against the
requested name only, never against an address literal.  A network is matched against the
addresses.  Only allowed addresses are connected to.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import errno as _errno
import fnmatch
import functools
import ipaddress
import logging
import socket

from vinehpc.protocol import ProtocolError, handshake

from ._relay import (CONNECT_TIMEOUT, HANDSHAKE_TIMEOUT, Deadline, LoopThread, Reader, Relay, connect, listener,
                     literal_addrinfo, new_socket, tune)

log = logging.getLogger("vinehpc.tunnel.egress")

MAX_STREAMS = 4096
RESOLVER_THREADS = 64


class Rule:
    """One allow pattern (see the module docstring)."""

    def __init__(self, pattern: str):
        self.pattern = pattern
        p = pattern.strip()
        port = None
        if p.startswith("["):
            host, _, rest = p[1:].partition("]")
            if rest:
                if not rest.startswith(":"):
                    raise ValueError("allow pattern %r: expected [V6]:PORT" % pattern)
                port = rest[1:]
        elif p.count(":") == 1:
            host, port = p.split(":")
        else:
            host = p                      # a name, or a v6 address/network without a port
        self.lo, self.hi = 0, 65535
        if port not in (None, "", "*"):
            lo, _, hi = port.partition("-")
            try:
                self.lo, self.hi = int(lo), int(hi or lo)
            except ValueError:
                raise ValueError("allow pattern %r: bad port %r" % (pattern, port)) from None
        if not host:
            raise ValueError("allow pattern %r: no host" % pattern)
        self.net = None
        if "/" in host:
            try:
                self.net = ipaddress.ip_network(host, strict=False)
            except ValueError:
                raise ValueError("allow pattern %r: bad network %r" % (pattern, host)) from None
        self.glob = host.lower()
        self.address = self.net is None and _address_glob(self.glob)

    def port_ok(self, port: int) -> bool:
        return self.lo <= port <= self.hi

    def name_ok(self, host: str) -> bool:
        """A name pattern matching the requested name (an address literal is no name)."""
        return (self.net is None and not self.address and not _is_address(host)
                and fnmatch.fnmatchcase(host.lower(), self.glob))

    def addr_ok(self, ip: str) -> bool:
        """A network or an address pattern matching one resolved address."""
        if self.net is not None:
            try:
                return ipaddress.ip_address(ip) in self.net
            except ValueError:
                return False
        return self.address and fnmatch.fnmatchcase(ip.lower(), self.glob)

    def __repr__(self):
        return "Rule(%r)" % self.pattern


class Policy:
    def __init__(self, allow):
        self.rules = None if allow is None else [Rule(p) for p in allow]

    def may_try(self, host: str, port: int) -> bool:
        """Before resolving: could any rule allow this destination? (no DNS for a sure no)"""
        if self.rules is None:
            return True
        return any(r.port_ok(port) and (r.name_ok(host) or r.net is not None or r.address) for r in self.rules)

    def allowed(self, host: str, port: int, ip: str) -> bool:
        if self.rules is None:
            return True
        return any(r.port_ok(port) and (r.name_ok(host) or r.addr_ok(ip)) for r in self.rules)


_GLOB = frozenset("*?[]!-")
_V4_CHARS = frozenset("0123456789.") | _GLOB
_V6_CHARS = frozenset("0123456789abcdef.:") | _GLOB


def _address_glob(glob: str) -> bool:
    """Can this glob only spell addresses?  IPv4 ones have no letters at all (`cafe.de` is a
    name); a colon never appears in a name, so with one it is IPv6 (hex digits allowed)."""
    return set(glob) <= (_V6_CHARS if ":" in glob else _V4_CHARS)


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


class Egress:
    """Opens the real outbound connections for authenticated proxies."""

    def __init__(self, secret: str, *, host: str = "0.0.0.0", port: int = 0, allow: list | None = None,
                 connect_timeout: float = CONNECT_TIMEOUT, handshake_timeout: float = HANDSHAKE_TIMEOUT,
                 max_streams: int = MAX_STREAMS):
        if not secret:
            raise ValueError("Egress needs the run's secret")
        self.secret = secret
        self.host = host
        self.port = port
        self.policy = Policy(allow)        # raises ValueError on a bad pattern, before anything starts
        self.connect_timeout = connect_timeout
        self.handshake_timeout = handshake_timeout
        self.max_streams = max_streams
        # waiting: connections that have not asked for a stream yet (proxies keep a few ready);
        # active: the others, until closed
        self._stats = dict(accepted=0, opened=0, active=0, waiting=0, denied=0, refused=0, failed=0, auth_failed=0,
                           bytes_out=0, bytes_in=0)
        self._sock = None
        self._lt = None
        self._tasks = set()                # handshakes under way
        self._waiting = {}                 # the tasks of connections not yet asking, oldest first
        self._resolver = None              # name lookups (see _resolve)
        self._lookups = {}                 # (host, port) -> the lookup under way
        self._relays = set()               # open streams
        self._paused = False

    # ------------------------------------------------------------------------- lifecycle
    def start(self) -> "Egress":
        s = self._sock = listener(self.host, self.port)
        self.port = s.getsockname()[1]
        self._lt = LoopThread("egress").start()
        self._lt.call(self._lt.loop.add_reader, s.fileno(), self._on_accept)
        log.info("egress listening on %s:%d (allow: %s)", self.host, self.port,
                 "all" if self.policy.rules is None else [r.pattern for r in self.policy.rules])
        return self

    def stop(self) -> None:
        """Stop accepting and tear down every open stream and handshake."""
        lt, self._lt = self._lt, None
        if lt is not None:
            lt.shut(self._shutdown)

    def _shutdown(self):
        s, self._sock = self._sock, None
        if s is not None:
            if not self._paused:
                asyncio.get_running_loop().remove_reader(s.fileno())
            s.close()
        for r in list(self._relays):
            r.stop()
        for t in list(self._tasks):
            t.cancel()
        if self._resolver is not None:       # a lookup in progress cannot be interrupted: do not wait
            self._resolver.shutdown(wait=False, cancel_futures=True)

    def __enter__(self):
        return self.start() if self._sock is None else self

    def __exit__(self, *exc):
        self.stop()

    @property
    def stats(self) -> dict:
        return dict(self._stats)

    def _count(self, key, n=1):
        self._stats[key] += n

    # ------------------------------------------------------------------------- streams
    def _on_accept(self):
        loop = asyncio.get_running_loop()
        listener = self._sock
        for _ in range(64):
            try:
                c, peer = listener.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (_errno.EMFILE, _errno.ENFILE, _errno.ENOBUFS, _errno.ENOMEM):
                    log.warning("accept: %s (out of descriptors/memory); backing off", e)
                    loop.remove_reader(listener.fileno())
                    self._paused = True
                    loop.call_later(0.1, self._resume_accept)
                return
            self._stats["accepted"] += 1
            if self._stats["active"] + self._stats["waiting"] >= self.max_streams:
                if self._waiting:
                    # full: a connection kept ready by some proxy gives way (it opens a fresh one)
                    oldest = next(iter(self._waiting))
                    gone = self._waiting.pop(oldest)
                    self._stats[gone[0]] -= 1      # now: the new stream takes its place at once
                    gone[0] = None                 # (counted off here, not again when it ends)
                    oldest.cancel()
                else:
                    log.warning("stream from %s:%d refused: %d streams open (max_streams)", peer[0], peer[1],
                                self.max_streams)
                    c.close()
                    self._count("failed")
                    continue
            self._stats["waiting"] += 1
            c.setblocking(False)
            tune(c)
            state = ["waiting", False]     # [which counter holds it (None: none), has its coroutine started]
            t = loop.create_task(self._stream(c, peer, state))
            self._tasks.add(t)
            self._waiting[t] = state
            t.add_done_callback(functools.partial(self._stream_ended, c, state))

    def _stream_ended(self, c, state, t):
        self._tasks.discard(t)
        self._waiting.pop(t, None)
        if not state[1]:                   # cancelled before it ran: account for it here
            c.close()
            if state[0] is not None:
                self._stats[state[0]] -= 1

    async def _resolve(self, loop, host, port):
        """getaddrinfo on the egress's own resolver threads (RESOLVER_THREADS; asyncio's default
        executor has min(32, cores + 4): on 2 cores, 6 lookups of names nobody answers for would
        hold up every other name), one lookup per name at a time however many streams ask."""
        if self._resolver is None:
            self._resolver = concurrent.futures.ThreadPoolExecutor(RESOLVER_THREADS, thread_name_prefix="egress-dns")
        key = (host, port)
        fut = self._lookups.get(key)
        if fut is None:
            fut = loop.run_in_executor(self._resolver, functools.partial(
                socket.getaddrinfo, host, port, type=socket.SOCK_STREAM))
            self._lookups[key] = fut

            def done(f):
                self._lookups.pop(key, None)
                if not f.cancelled():
                    f.exception()            # retrieved: no "never retrieved" noise if nobody waits now
            fut.add_done_callback(done)
        return await asyncio.shield(fut)     # a stream giving up does not cancel the others' lookup

    def _resume_accept(self):
        if self._sock is not None and self._paused:
            self._paused = False
            asyncio.get_running_loop().add_reader(self._sock.fileno(), self._on_accept)

    async def _stream(self, c, peer, state):
        state[1] = True
        d = None
        try:
            d = await self._handshake(c, peer, state)
        except asyncio.CancelledError:
            pass                         # stopping
        except Exception:
            log.exception("stream from %s:%d", peer[0], peer[1])
        if d is None:
            c.close()
            if state[0] is not None:
                self._stats[state[0]] -= 1
            return
        sock, dest, first = d
        r = None

        def closed(out, back):
            self._relays.discard(r)
            self._stats["bytes_out"] += out
            self._stats["bytes_in"] += back
            self._stats["active"] -= 1
            log.debug("stream %s:%d -> %s closed: %d bytes out, %d in", peer[0], peer[1], dest, out, back)
        r = Relay(asyncio.get_running_loop(), c, sock, first, on_close=closed)
        if not r.closed:
            self._relays.add(r)

    async def _handshake(self, c, peer, state):
        """Returns (destination socket, "host:port", bytes for it) for an open stream, else None."""
        loop = asyncio.get_running_loop()
        dl = Deadline(loop)
        dl.set(self.handshake_timeout, "handshake")
        hs = handshake.Greeter(self.secret, handshake.TUNNEL)
        try:
            await loop.sock_sendall(c, hs.hello())
            m = await Reader(loop, c).handshake(hs)
            self._waiting.pop(asyncio.current_task(), None)
            self._stats["waiting"] -= 1
            self._stats["active"] += 1
            state[0] = "active"
        except (OSError, ProtocolError, asyncio.CancelledError) as e:
            dl.clear()
            if isinstance(e, asyncio.CancelledError) and not dl.fired:
                raise
            log.warning("stream from %s:%d: %s; closed", peer[0], peer[1],
                        "handshake failed: no authentication within %.0f s" % self.handshake_timeout if dl.fired
                        else e if isinstance(e, handshake.AuthFailed) else "handshake failed: %s" % e)
            self._count("auth_failed")
            return None
        dl.clear()
        if m is None:                   # a proxy closing a connection it kept ready: normal
            log.debug("stream from %s:%d: closed before asking for a stream", peer[0], peer[1])
            return None
        host, port = m.dest["host"], m.dest["port"]
        where = "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)
        bad_dest = not (0 < len(host) <= 255 and 0 < port <= 65535)

        async def fail(kind, detail, err=None, stat="failed"):
            self._count(stat)
            log.info("stream from %s:%d to %s: %s (%s)", peer[0], peer[1], where, kind, detail)
            try:
                dl.set(self.handshake_timeout, "reply")
                await loop.sock_sendall(c, hs.welcome(ok=False, error=kind, detail=detail, errno=err))
            except (OSError, asyncio.CancelledError) as e:
                if isinstance(e, asyncio.CancelledError) and not dl.fired:
                    raise
            finally:
                dl.clear()
            return None

        if bad_dest:     # an authenticated proxy asked for no valid destination: its stream fails
            return await fail("failed", "%r is not a valid destination" % where)
        if not self.policy.may_try(host, port):
            return await fail("denied", "%s is not in the egress's allow list" % where, stat="denied")
        infos = literal_addrinfo(host, port)
        if infos is None:
            try:
                dl.set(self.connect_timeout, "resolve")
                infos = await self._resolve(loop, host, port)
            except socket.gaierror as e:
                return await fail("dns", "cannot resolve %s: %s" % (host, e.strerror or e))
            except (OSError, UnicodeError) as e:
                return await fail("dns", "cannot resolve %s: %s" % (host, e))
            except asyncio.CancelledError:
                if not dl.fired:
                    raise
                return await fail("dns", "cannot resolve %s: no answer within %.0f s" % (host, self.connect_timeout))
            finally:
                dl.clear()
        infos = [i for i in infos if self.policy.allowed(host, port, i[4][0])]
        if not infos:
            return await fail("denied", "%s is not in the egress's allow list" % where, stat="denied")
        err = None
        for fam, typ, proto, _, addr in infos:
            try:
                s = new_socket(fam)
            except OSError as e:             # out of descriptors: this stream fails, nothing else
                err = e
                break
            try:
                dl.set(self.connect_timeout, "connect")
                await connect(loop, s, addr)
            except asyncio.CancelledError:
                s.close()
                if not dl.fired:
                    raise
                err = TimeoutError()
                continue
            except BaseException as e:
                s.close()
                if not isinstance(e, OSError):
                    raise
                err = e
                continue
            finally:
                dl.clear()
            try:
                dl.set(self.handshake_timeout, "welcome")
                await loop.sock_sendall(c, hs.welcome(ok=True))
            except (OSError, asyncio.CancelledError) as e:
                s.close()
                if isinstance(e, asyncio.CancelledError) and not dl.fired:
                    raise
                log.info("stream from %s:%d: proxy went away: %s", peer[0], peer[1], e)
                return None
            finally:
                dl.clear()
            self._count("opened")
            # bytes the proxy sent behind its request (a plain HTTP request) go to the destination first
            return s, where, hs.rest
        e = err
        if isinstance(e, (socket.timeout, TimeoutError)):
            return await fail("timeout", "connect to %s timed out after %.0f s" % (where, self.connect_timeout),
                              _errno.ETIMEDOUT)
        if isinstance(e, ConnectionRefusedError):
            return await fail("refused", "connection to %s refused" % where, e.errno, stat="refused")
        if e is not None and e.errno in (_errno.ENETUNREACH, _errno.EHOSTUNREACH, _errno.EHOSTDOWN,
                                         _errno.ENETDOWN, _errno.EADDRNOTAVAIL):
            return await fail("unreachable", "%s: %s" % (where, e.strerror), e.errno)
        return await fail("failed", "%s: %s" % (where, e), getattr(e, "errno", None))
