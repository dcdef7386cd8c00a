"""The sans-I/O handshake (vinehpc/protocol/handshake.py): both sides in memory, no sockets."""
import pytest

from vinehpc.protocol import ProtocolError, auth, messages, wire
from vinehpc.protocol.handshake import TUNNEL, WORKER, Answerer, AuthFailed, Greeter

DEST = {"host": "example.org", "port": 443}


def run(g, a, dest=None, welcome=None):
    """The whole exchange, each side's output fed whole to the other. Returns (auth, welcome)."""
    hello = a.receive_data(g.hello())
    assert isinstance(hello, messages.Hello) and hello.nonce == g.nonce
    got = g.receive_data(a.auth(dest=dest))
    assert isinstance(got, messages.Auth) and g.state == "authenticated"
    w = a.receive_data(g.welcome(**(welcome or {})))
    assert isinstance(w, messages.Welcome) and a.state == "done" and g.state == "done"
    return got, w


@pytest.mark.parametrize("roles,dest", [(WORKER, None), (TUNNEL, DEST)])
def test_both_roles_against_each_other(roles, dest):
    s = auth.new_secret()
    got, w = run(Greeter(s, roles), Answerer(s, roles), dest, {"wid": 4, "keepalive": [5.0, 30.0]})
    assert got.dest == dest
    assert (w.wid, w.keepalive) == (4, [5.0, 30.0])


def test_macs_are_byte_compatible_with_the_documented_formulas():
    s = auth.new_secret()
    g, a = Greeter(s, TUNNEL), Answerer(s, TUNNEL)
    a.receive_data(g.hello())
    m = g.receive_data(a.auth(dest=DEST))
    assert m.mac == auth.mac(s, "tunnel-proxy", g.nonce, "%s|%s|%d" % (a.nonce, "example.org", 443))
    w = messages.decode(*messages.decoder().feed(g.welcome(ok=True))[0])
    assert w.mac == auth.mac(s, "tunnel-egress", a.nonce, g.nonce)
    g, a = Greeter(s, WORKER), Answerer(s, WORKER)
    a.receive_data(g.hello())
    assert g.receive_data(a.auth()).mac == auth.mac(s, "worker", g.nonce, a.nonce)


@pytest.mark.parametrize("roles,dest", [(WORKER, None), (TUNNEL, DEST)])
def test_wrong_secret_fails_at_the_greeter(roles, dest):
    g, a = Greeter("right", roles), Answerer("wrong", roles)
    a.receive_data(g.hello())
    with pytest.raises(AuthFailed, match="wrong secret"):
        g.receive_data(a.auth(dest=dest))
    assert g.state == "failed"
    with pytest.raises(RuntimeError):
        g.welcome()                   # a failed greeter never proves anything


@pytest.mark.parametrize("roles,dest", [(WORKER, None), (TUNNEL, DEST)])
def test_wrong_secret_fails_at_the_answerer(roles, dest):
    # a fake greeter (it skips checking the answerer) cannot prove it knows the secret
    fake, a = Greeter("wrong", roles), Answerer("right", roles)
    a.receive_data(fake.hello())
    a_auth = a.auth(dest=dest)
    fake._dec.push(a_auth)
    fake.peer_nonce = messages.decode(*fake._dec.next_message()).nonce
    fake.state = "authenticated"
    with pytest.raises(AuthFailed, match="did not prove"):
        a.receive_data(fake.welcome())
    assert a.state == "failed"


def test_replayed_auth_fails_on_a_new_connection():
    s = auth.new_secret()
    g1, a = Greeter(s, WORKER), Answerer(s, WORKER)
    a.receive_data(g1.hello())
    recorded = a.auth()
    assert g1.receive_data(recorded) is not None        # genuine the first time
    g2 = Greeter(s, WORKER)
    g2.hello()
    assert g2.nonce != g1.nonce
    with pytest.raises(AuthFailed):
        g2.receive_data(recorded)


def test_replayed_welcome_fails_on_a_new_connection():
    s = auth.new_secret()
    g, a1 = Greeter(s, WORKER), Answerer(s, WORKER)
    hello = g.hello()
    a1.receive_data(hello)
    g.receive_data(a1.auth())
    recorded = g.welcome(wid=1)
    a2 = Answerer(s, WORKER)                             # same hello replayed to a new answerer
    a2.receive_data(hello)
    a2.auth()
    with pytest.raises(AuthFailed):
        a2.receive_data(recorded)


def test_worker_mac_is_not_an_egress_mac_and_back():
    s = auth.new_secret()
    # an auth in the tunnel's shape with a MAC made under the worker's role fails at the egress
    g = Greeter(s, TUNNEL)
    g.hello()
    nonce = auth.nonce()
    fake = messages.Auth(v=wire.VERSION, nonce=nonce, dest=DEST,
                         mac=auth.mac(s, "worker", g.nonce, "%s|example.org|443" % nonce))
    with pytest.raises(AuthFailed):
        g.receive_data(messages.encode_bytes(fake))
    # a worker's genuine auth is refused by an egress, and an egress's by a manager
    g, a = Greeter(s, TUNNEL), Answerer(s, WORKER)
    with pytest.raises(ProtocolError, match="hello of a manager, got one from a egress"):
        a.receive_data(g.hello())
    g, a = Greeter(s, WORKER), Answerer(s, TUNNEL)
    with pytest.raises(ProtocolError, match="hello of a egress"):
        a.receive_data(g.hello())
    # a manager's welcome MAC is not an egress's
    g, a = Greeter(s, WORKER), Answerer(s, WORKER)
    a.receive_data(g.hello())
    g.receive_data(a.auth())
    wrong_role = messages.Welcome(mac=auth.mac(s, "tunnel-egress", a.nonce, g.nonce))
    with pytest.raises(AuthFailed):
        a.receive_data(messages.encode_bytes(wrong_role))


def test_dest_required_by_the_tunnel_and_refused_by_workers():
    s = auth.new_secret()
    for roles, with_dest in ((WORKER, True), (TUNNEL, False)):
        g, a = Greeter(s, roles), Answerer(s, roles)
        a.receive_data(g.hello())
        with pytest.raises(ValueError):
            a.auth(dest=DEST if with_dest else None)
        # hand-made: an auth of the other protocol's shape
        body = messages.Auth(v=1, nonce=a.nonce, mac="00", dest=DEST if with_dest else None)
        with pytest.raises(ProtocolError, match="auth with(out)? a destination"):
            g.receive_data(messages.encode_bytes(body))


def test_split_byte_by_byte():
    s = auth.new_secret()
    g, a = Greeter(s, WORKER), Answerer(s, WORKER)
    hello = g.hello()
    got = [a.receive_data(hello[i:i + 1]) for i in range(len(hello))]
    assert all(x is None for x in got[:-1]) and isinstance(got[-1], messages.Hello)
    au = a.auth()
    got = [g.receive_data(au[i:i + 1]) for i in range(len(au))]
    assert all(x is None for x in got[:-1]) and isinstance(got[-1], messages.Auth)
    w = g.welcome(wid=2)
    got = [a.receive_data(w[i:i + 1]) for i in range(len(w))]
    assert all(x is None for x in got[:-1]) and got[-1].wid == 2
    assert a.rest == b"" and g.rest == b""


def test_welcome_followed_by_messages_in_the_same_read():
    # the manager sends its welcome and then tasks at once: the worker keeps the bytes behind it
    s = auth.new_secret()
    g, a = Greeter(s, WORKER), Answerer(s, WORKER)
    a.receive_data(g.hello())
    g.receive_data(a.auth())
    fn = messages.Fn(fid="f", data=b"\x80pickle")      # frames: refused by pre-auth limits if decoded there
    behind = messages.encode_bytes(fn) + messages.encode_bytes(messages.Ping())
    w = a.receive_data(g.welcome(wid=9) + behind)
    assert w.wid == 9 and a.rest == behind
    msgs = messages.decoder().feed(a.rest)
    assert [messages.decode(*m) for m in msgs] == [fn, messages.Ping()]


def test_bytes_behind_the_auth_are_kept_for_the_tunnel():
    s = auth.new_secret()
    g, a = Greeter(s, TUNNEL), Answerer(s, TUNNEL)
    a.receive_data(g.hello())
    early = b"GET / HTTP/1.1\r\nHost: example.org\r\n\r\n"
    assert g.receive_data(a.auth(dest=DEST) + early) is not None
    assert g.rest == early


def test_garbage_before_authentication():
    g = Greeter("s", WORKER)
    g.hello()
    with pytest.raises(ProtocolError, match="magic"):
        g.receive_data(b"GET / HTTP/1.1\r\n\r\n")
    assert g.state == "failed"
    a = Answerer("s", WORKER)
    with pytest.raises(ProtocolError, match="magic"):
        a.receive_data(b"\x00" * 64)


def test_oversized_or_framed_data_before_authentication():
    g = Greeter("s", WORKER)
    g.hello()
    with pytest.raises(ProtocolError, match="control part of 4097 bytes"):
        g.receive_data(wire.HEADER.pack(wire.MAGIC, wire.VERSION, messages.CODES["auth"], 0, wire.PREAUTH_MAX_CTL + 1))
    g = Greeter("s", WORKER)
    g.hello()
    # nothing that could carry a pickle is accepted before authentication
    with pytest.raises(ProtocolError, match="before authentication"):
        g.receive_data(messages.encode_named("auth", {"v": 1, "nonce": "n", "mac": "m"}, [b"\x80pickle"])[0])


def test_wrong_or_malformed_message_before_authentication():
    for data, match in ((messages.encode_bytes(messages.Ping()), "expected auth, got ping"),
                        (b"".join(messages.encode_named("auth", {"v": 1, "nonce": 5, "mac": "m"})), "field 'nonce'"),
                        (b"".join(messages.encode_named("auth", {"v": 1, "nonce": "n", "mac": "m", "x": 1})),
                         "unknown field")):
        g = Greeter("s", WORKER)
        g.hello()
        with pytest.raises(ProtocolError, match=match):
            g.receive_data(data)
    a = Answerer("s", WORKER)
    with pytest.raises(ProtocolError, match="expected hello, got welcome"):
        a.receive_data(messages.encode_bytes(messages.Welcome(mac="m")))


def test_steps_out_of_order_are_refused():
    g, a = Greeter("s", WORKER), Answerer("s", WORKER)
    with pytest.raises(RuntimeError):
        g.welcome()
    with pytest.raises(RuntimeError):
        a.auth()
    g.hello()
    with pytest.raises(RuntimeError):
        g.hello()


@pytest.mark.parametrize("depth", [200, 900, 1000, 2000])
def test_a_value_nested_deep_before_authentication_is_refused_not_a_crash(depth):
    """A stranger's auth whose field is nested as deep as fits in 4 KiB: refused (ProtocolError) by
    the parser or the field's check, never a RecursionError out of the handshake (the manager's
    I/O thread caught it only as a crash)."""
    deep = b"[" * depth + b"]" * depth
    ctl = b'{"v":1,"nonce":' + deep + b',"mac":"m"}'
    data = wire.head_of(messages.CODES["auth"], ctl, ())
    g = Greeter("s", WORKER)
    g.hello()
    with pytest.raises(ProtocolError):
        g.receive_data(data)
