"""Optional TLS on the manager's port (Manager(ssl=True) or ssl=(key, cert)), with the standard
library's ssl: the pieces every end uses, so the manager, the worker, `vinehpc status` (and a
later peer-transfer or tunnel listener) wrap their sockets the same way:

    server:  st = ServerTLS(key, cert)  (or ServerTLS(*generate_pair(private_dir)))
             s = st.wrap(accepted)  then handshake_step(s) on readiness until it returns None
    client:  s = wrap_client(sock, fingerprint)                      (blocking)
             or client_context().wrap_socket(sock, do_handshake_on_connect=False),
             handshake_step(s) until None, then check_pin(s, fingerprint)   (non-blocking)
    then:    comm.Connection(s) reads and writes it like a plain socket (no sendfile, pending() drained)

Trust is a pin, not a CA: the run's certificate fingerprint (SHA-256 of its DER form) travels
wherever the run's secret goes (RUN_DIR/tls-fingerprint beside RUN_DIR/secret, a pilot's
contact file, local workers' environment), and a client refuses a server whose certificate has
another fingerprint before it sends a byte of its own.  Host names are not checked: workers reach
managers by whatever address works (loopback, a node name, an IP), and the pin is stronger.

Who speaks TLS is announced, in plaintext, before it starts: a TLS manager's first bytes are
ANNOUNCE (a `hello` whose role is "tls"), then it waits for the client's TLS handshake.  So a
worker without TLS meeting a TLS manager, or a TLS worker meeting a plain one, can say exactly
what is wrong instead of timing out (handshake.Answerer checks it).  The run's own handshake
(the secret's MACs) then runs inside TLS, unchanged: nothing is unpickled before it succeeds.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import ssl
import subprocess

from . import messages
from .wire import VERSION, ProtocolError

TLS_ROLE = "tls"
ANNOUNCE = messages.encode_bytes(messages.Hello(v=VERSION, nonce="-", role=TLS_ROLE))
FINGERPRINT_FILE = "tls-fingerprint"       # in the run directory, beside `secret`
HOW_TO_GIVE = ("give the worker the run's certificate fingerprint: --tls-fingerprint (RUN_DIR/%s), "
               "VINEHPC_TLS_FINGERPRINT, or --contact RUN_DIR/contact.json" % FINGERPRINT_FILE)


class TLSError(ProtocolError):
    """TLS cannot work with this peer, and trying again will not help: it does not speak TLS (or
    speaks it where we do not), or its certificate has another fingerprint.  (A handshake cut
    short is a plain ProtocolError: a manager stopping, worth another try.)"""


# ---------------------------------------------------------------- certificates and fingerprints
def generate_pair(directory: str) -> tuple:
    """A fresh self-signed key and certificate for one run: (key path, cert path) in `directory`
    (the private run directory), the key 0600.  The standard library cannot make certificates:
    the `openssl` command does (present wherever Python's ssl module is usable)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("Manager(ssl=True) makes the run's self-signed certificate with the `openssl` command, "
                           "which is not on PATH: install it (apt install openssl, or `module load openssl`), "
                           "or give your own pair: Manager(ssl=(key_file, cert_file))")
    key, cert = os.path.join(directory, "tls-key.pem"), os.path.join(directory, "tls-cert.pem")
    for p in (key, cert):
        if os.path.lexists(p):
            os.unlink(p)
    os.close(os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))    # 0600 before a byte is in it
    r = subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", key, "-out", cert, "-days", "3650", "-subj", "/CN=vinehpc-run"],
                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    if r.returncode != 0:
        raise RuntimeError("openssl could not make the run's certificate: %s"
                           % r.stdout.decode(errors="replace").strip()[-500:])
    os.chmod(key, 0o600)
    return key, cert


def fingerprint_of(der: bytes) -> str:
    return "sha256:" + hashlib.sha256(der).hexdigest()


def cert_fingerprint(cert_file: str) -> str:
    """The fingerprint of the first certificate in a PEM file (the server's own, before any chain)."""
    with open(cert_file) as f:
        text = f.read()
    m = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", text, re.S)
    if m is None:
        raise ValueError("%s holds no PEM certificate" % cert_file)
    return fingerprint_of(ssl.PEM_cert_to_DER_cert(m.group(0)))


def normalize_fingerprint(text: str) -> str:
    """"sha256:<64 hex>" from that form, bare hex, or openssl's "SHA256 Fingerprint=AB:CD:..."."""
    s = text.strip()
    s = s.split("=", 1)[1] if "=" in s else s
    s = s[len("sha256:"):] if s.lower().startswith("sha256:") else s
    s = s.replace(":", "").lower()
    if not re.fullmatch(r"[0-9a-f]{64}", s):
        raise ValueError("not a SHA-256 certificate fingerprint: %r" % text[:100])
    return "sha256:" + s


# ---------------------------------------------------------------- the server side
class ServerTLS:
    """A server's certificate: `wrap(sock)` makes an accepted socket a TLS one whose handshake
    the caller drives (handshake_step, non-blocking); `fingerprint` is what clients pin."""

    def __init__(self, key_file: str, cert_file: str):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.num_tickets = 0         # no session resumption: a worker connects once per manager
        # (TLS 1.2) no renegotiation: an SSL write then never waits for a read (comm/conn.py)
        ctx.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
        try:
            ctx.load_cert_chain(cert_file, key_file)
        except (OSError, ssl.SSLError) as e:
            raise ValueError("cannot use the TLS pair (key %s, certificate %s): %s" % (key_file, cert_file, e)) \
                from None
        self.ctx = ctx
        self.key_file, self.cert_file = key_file, cert_file
        self.fingerprint = cert_fingerprint(cert_file)

    def wrap(self, sock) -> ssl.SSLSocket:
        return self.ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)


def handshake_step(sock: ssl.SSLSocket):
    """One step of a non-blocking TLS handshake: None once done, else "read" or "write" (what
    the socket must become ready for before the next step).  Raises TLSError."""
    try:
        sock.do_handshake()
        return None
    except ssl.SSLWantReadError:
        return "read"
    except ssl.SSLWantWriteError:
        return "write"
    except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError) as e:
        raise TLSError("closed before completing the TLS handshake (%s): a worker without TLS, or one that "
                       "refused our certificate? %s" % (e.__class__.__name__, HOW_TO_GIVE)) from None
    except (ssl.SSLError, OSError) as e:
        raise TLSError("TLS handshake failed (%s): a peer that does not speak TLS? %s" % (e, HOW_TO_GIVE)) from None


# ---------------------------------------------------------------- the client side
_client_ctx = None


def client_context() -> ssl.SSLContext:
    """The client side's context (one per process).  No CA, no host name: the server is
    checked by its pinned fingerprint (check_pin) right after the handshake.  A non-blocking
    client: client_context().wrap_socket(sock, do_handshake_on_connect=False), handshake_step()
    until done, then check_pin() before sending anything."""
    global _client_ctx
    if _client_ctx is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
        _client_ctx = ctx
    return _client_ctx


def check_pin(sock: ssl.SSLSocket, fingerprint: str, peer: str = "the manager") -> None:
    """Raise TLSError (closing the socket) unless the server's certificate has `fingerprint`.
    (The handshake has already made the server prove it holds that certificate's key.)"""
    want = normalize_fingerprint(fingerprint)
    der = sock.getpeercert(binary_form=True)
    got = fingerprint_of(der) if der else None
    if got != want:
        sock.close()
        raise TLSError("%s's TLS certificate has fingerprint %s, not the run's %s: another run's manager at "
                       "that address, or someone in between; refusing to talk to it (check the fingerprint "
                       "given with --tls-fingerprint / VINEHPC_TLS_FINGERPRINT)" % (peer, got, want))


def wrap_client(sock, fingerprint: str, peer: str = "the manager") -> ssl.SSLSocket:
    """Run the TLS handshake on a connected (blocking, or with a timeout) socket and check the
    server's certificate against `fingerprint`; returns the TLS socket.  Raises TLSError for a
    certificate with another fingerprint, ProtocolError for a handshake cut short (the socket is
    closed then).  Nothing of ours is sent before the fingerprint matched."""
    normalize_fingerprint(fingerprint)      # a malformed one is the caller's error, before any I/O
    try:
        s = client_context().wrap_socket(sock)
    except (ssl.SSLError, OSError) as e:
        sock.close()
        raise ProtocolError("TLS handshake with %s failed: %s" % (peer, e)) from None
    check_pin(s, fingerprint, peer)
    return s
