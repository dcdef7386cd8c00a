"""The handshake, sans I/O: bytes in, typed messages out, bytes to send handed back.  No
sockets and no clock here: the drivers (the manager's server, the worker, the tunnel's egress
and proxy) do the reading, writing and timeouts.

Two sides.  The *greeter* speaks first (the manager; the tunnel egress), the *answerer* answers
(a worker; a worker's tunnel proxy):

    greeter  -> answerer  hello   {v, nonce: Ng, role}
    answerer -> greeter   auth    {v, nonce: Na, mac: H(secret, answerer role | Ng | Na [|host|port])
                                   [, dest: {host, port}]}
    greeter  -> answerer  welcome {mac: H(secret, greeter role | Na | Ng), ...what the session needs}

Both prove they know the secret, and each MAC covers a nonce the checking side just made, so a
recorded exchange cannot be replayed.  The role strings differ per side and per protocol
(WORKER: "worker"/"manager", TUNNEL: "tunnel-proxy"/"tunnel-egress", STATUS:
"status"/"manager-status"), so a MAC made for one is never accepted as another: not reflected back, not carried from a worker session into the
tunnel.  A tunnel proxy's MAC also covers the destination it asks for.

Before authentication the decoder allows a tiny control part and no payload frames at all (so
nothing can be unpickled: frames are where pickles travel), and it takes one message at a time:
whatever the peer sent behind the handshake's last message stays undecoded in `rest`, for the
driver's authenticated connection (the manager may send tasks right behind its welcome).

    g = Greeter(secret, WORKER)            a = Answerer(secret, WORKER)
    send(g.hello())
                                           hello = a.receive_data(got)   # None: need more bytes
                                           send(a.auth())
    auth = g.receive_data(got)             # raises AuthFailed, ProtocolError
    send(g.welcome(wid=3, ...))
                                           welcome = a.receive_data(got)
    conn = Connection(sock, g.rest)        conn = Connection(sock, a.rest)
"""
from __future__ import annotations

from . import auth as _auth
from . import messages
from .tls import HOW_TO_GIVE, TLS_ROLE, TLSError
from .wire import PREAUTH_MAX_CTL, VERSION, ProtocolError


class AuthFailed(ProtocolError):
    """The peer does not know the secret (or replayed someone else's proof)."""


class Roles:
    """One protocol that opens with this handshake: the role strings of its MACs, the role its
    hello announces, and whether the answerer's MAC covers a destination (`dest`)."""
    __slots__ = ("greeter", "answerer", "hello_role", "dest")

    def __init__(self, greeter, answerer, hello_role, dest):
        self.greeter, self.answerer, self.hello_role, self.dest = greeter, answerer, hello_role, dest


WORKER = Roles(greeter="manager", answerer="worker", hello_role="manager", dest=False)
TUNNEL = Roles(greeter="tunnel-egress", answerer="tunnel-proxy", hello_role="egress", dest=True)
# `vinehpc status` asking a manager for its figures: greeted by the same hello as a worker (the
# manager cannot know who connects), proven with MACs of its own roles, so a status client's proof
# never makes it a worker and a worker's never a status client.
STATUS = Roles(greeter="manager-status", answerer="status", hello_role="manager", dest=False)
# a worker serving its cache (the greeter: it accepts) to another worker of the run fetching from it
PEER = Roles(greeter="peer-source", answerer="peer-fetcher", hello_role="peer", dest=False)


def _bound(answerer_nonce, dest) -> str:
    """What the answerer's MAC covers besides the greeter's nonce: its nonce (and destination)."""
    return answerer_nonce if dest is None else "%s|%s|%d" % (answerer_nonce, dest["host"], dest["port"])


class _Side:
    def __init__(self, secret: str, roles: Roles):
        self.secret = secret
        self.roles = roles
        self.nonce = _auth.nonce()          # fresh per connection: what makes replays fail
        self.state = None
        self._dec = messages.decoder(max_ctl=PREAUTH_MAX_CTL, allow_frames=False)

    @property
    def rest(self) -> bytes:
        """Bytes received behind the handshake's last message (for the authenticated connection)."""
        return bytes(self._dec.buf)

    def _expect(self, name, data):
        """The next message, which must be `name`, or None until it is complete."""
        self._dec.push(data)
        try:
            m = self._dec.next_message()
            if m is None:
                return None
            if m[0] != name:
                raise ProtocolError("expected %s, got %s" % (name, m[0]))
            return messages.decode(*m)
        except ProtocolError:
            self.state = "failed"
            raise

    def _move(self, want, to):
        if self.state != want:
            raise RuntimeError("handshake: not allowed in state %s" % self.state)
        self.state = to


class Greeter(_Side):
    """The side that speaks first: hello(), then receive_data() until it returns the peer's Auth
    (raises AuthFailed or ProtocolError), then welcome().  `also`: more Roles with the same hello
    that a peer may prove instead (the manager: WORKER or STATUS); after authentication `roles`
    is the one it proved."""

    def __init__(self, secret: str, roles: Roles, *also: Roles):
        super().__init__(secret, roles)
        if any(r.hello_role != roles.hello_role for r in also):
            raise ValueError("roles a greeter accepts share its hello")
        self.choices = (roles,) + also
        self.state = "start"        # start -> wait auth -> authenticated -> done; or failed

    def hello(self) -> bytes:
        self._move("start", "wait auth")
        return messages.encode_bytes(messages.Hello(v=VERSION, nonce=self.nonce, role=self.roles.hello_role))

    def receive_data(self, data: bytes):
        """The peer's Auth message once it has proven it knows the secret; None: need more bytes."""
        self._move("wait auth", "wait auth")
        m = self._expect("auth", data)
        if m is None:
            return None
        self.peer_nonce = m.nonce
        fit = [r for r in self.choices if (m.dest is not None) == r.dest]
        if not fit:
            self.state = "failed"
            raise ProtocolError("auth %s a destination" % ("without" if self.roles.dest else "with"))
        for r in fit:
            if _auth.check(self.secret, r.answerer, self.nonce, _bound(m.nonce, m.dest), m.mac):
                self.roles = r
                self.state = "authenticated"
                return m
        self.state = "failed"
        raise AuthFailed("authentication failed (wrong secret)")

    def welcome(self, **fields) -> bytes:
        """Our proof, with the session's fields (messages.Welcome's)."""
        self._move("authenticated", "done")
        mac = _auth.mac(self.secret, self.roles.greeter, self.peer_nonce, self.nonce)
        return messages.encode_bytes(messages.Welcome(mac=mac, **fields))


class Answerer(_Side):
    """The side that answers: receive_data() until it returns the Hello, auth(), then
    receive_data() until it returns the Welcome (raises AuthFailed or ProtocolError).

    `tls`: we expect the greeter to announce TLS (tls.ANNOUNCE) first.  Its announcement is
    returned as a Hello with role tls.TLS_ROLE: the driver then wraps its socket
    (tls.wrap_client), calls tls_started() and goes on reading the real hello inside TLS.  An
    announcement we do not expect, or a plain hello where we expect one, raises TLSError naming
    the fix (never a silent downgrade: a worker given a fingerprint speaks only TLS)."""

    def __init__(self, secret: str, roles: Roles, tls: bool = False):
        super().__init__(secret, roles)
        self.tls = tls
        self.state = "wait hello"   # [tls ->] wait hello -> hello -> wait welcome -> done; or failed

    def tls_started(self) -> None:
        """The driver has wrapped its socket after the announcement: the real hello comes next."""
        self._move("tls", "wait hello")
        if self._dec.buf:       # the greeter waits for our TLS handshake: nothing may follow its announcement
            self.state = "failed"
            raise ProtocolError("plaintext bytes after the TLS announcement")
        self.tls = False        # (announced once; the hello inside TLS is a plain one)

    def receive_data(self, data: bytes):
        """The Hello, then (after auth()) the Welcome once the greeter has proven it knows the
        secret; None: need more bytes."""
        if self.state == "wait hello":
            m = self._expect("hello", data)
            if m is not None and (m.role == TLS_ROLE) != self.tls:
                self.state = "failed"
                if self.tls:
                    raise TLSError("the manager does not use TLS, but we were given a certificate fingerprint: "
                                   "it was started without ssl (start it with Manager(ssl=True), `vinehpc run "
                                   "--ssl`), or it is not this run's manager; refusing to talk in plaintext")
                raise TLSError("the manager uses TLS (it was started with ssl): " + HOW_TO_GIVE)
            if m is not None and self.tls:
                self.state = "tls"
                return m
            if m is not None:
                if m.role != self.roles.hello_role:
                    self.state = "failed"
                    raise ProtocolError("expected the hello of a %s, got one from a %s" % (self.roles.hello_role, m.role))
                self.peer_nonce = m.nonce
                self.state = "hello"
            return m
        self._move("wait welcome", "wait welcome")
        m = self._expect("welcome", data)
        if m is None:
            return None
        if not _auth.check(self.secret, self.roles.greeter, self.nonce, self.peer_nonce, m.mac):
            self.state = "failed"
            raise AuthFailed("the peer did not prove it knows the secret")
        self.state = "done"
        return m

    def auth(self, dest: dict | None = None) -> bytes:
        """Our proof; `dest` ({host, port}: the tunnel's) is covered by it."""
        if (dest is not None) != self.roles.dest:
            raise ValueError("this handshake's auth %s a destination" % ("needs" if self.roles.dest else "takes no"))
        self._move("hello", "wait welcome")
        mac = _auth.mac(self.secret, self.roles.answerer, self.peer_nonce, _bound(self.nonce, dest))
        return messages.encode_bytes(messages.Auth(v=VERSION, nonce=self.nonce, mac=mac, dest=dest))
