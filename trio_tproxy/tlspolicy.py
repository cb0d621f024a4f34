"""TLS policy: the pyOpenSSL contexts, the checks after a handshake, and the TLS leg.

Why one module: every security decision about TLS is here, so it can be read
(and tested with real handshakes) in one place.  Around it, each with one job:
:mod:`.credentials` reads and checks our files; :mod:`.tlsstream` drives a
handshake and the bytes over trio and knows nothing about certificates;
:mod:`.tlserrors` turns OpenSSL errors into reasons; :mod:`.sessions` keeps
sessions to resume; :mod:`.ossl` holds every private pyOpenSSL binding.

The decisions:

* Both contexts trust only the configured CA bundle (never the system roots:
  a public CA must not be able to mint a mesh identity). TLS 1.2 is the floor,
  1.3 is preferred; TLS 1.2 is limited to ECDHE with AEAD ciphers. No
  compression, no renegotiation. ``OP_IGNORE_UNEXPECTED_EOF`` is deliberately
  not set: a FIN without close_notify must stay visible as truncation.
* The server requires a client certificate; the client requires a server
  certificate. OpenSSL checks the chain and dates; names are checked after the
  handshake by :mod:`trio_tproxy.identity` (pyOpenSSL has no name check).
* A verify callback records, never decides: the first X.509 error and the
  certificate the peer presented go into the connection's
  :class:`HandshakeNotes`, so a refusal can say "unknown CA" and name the
  certificate (OpenSSL itself only says "certificate verify failed").

The name check is a pure function of the certificate and the policy, so the
sidecar memoizes its verdicts by certificate (:class:`IdentityMemo`): a peer
that comes back (a resumed session, or the same certificate in a new full
handshake) is not parsed again.  The clock (``notAfter``) is still checked on
every connection, and OpenSSL's chain verification of a full handshake is
never skipped.

The proxy sees none of pyOpenSSL: :func:`connect` (egress) and :func:`accept`
(ingress) run the handshake within a deadline and the identity check, and
return a :class:`TLSLeg` (the stream, the verified peer, version, cipher,
resumption) or raise :class:`HandshakeFailed` with the reason for the log line.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from cryptography import x509
from OpenSSL import SSL, crypto

from . import identity, ossl
from .config import IdentityPolicy
from .credentials import Credentials
from .identity import IdentityError
from .sessions import SESSION_LIFETIME, SessionCache
from .tlserrors import VerifyError, explain
from .tlsstream import TLSStream

#: TLS 1.2 only (TLS 1.3 suites are all AEAD and set separately): forward
#: secrecy and authenticated encryption, nothing else.
TLS12_CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20"
#: Lets a server with client authentication accept session resumption
#: (without it OpenSSL aborts such a handshake with an internal error).
SESSION_ID_CONTEXT = b"trio-tproxy"
#: The ALPN protocol sidecars speak to each other. Our own name, not "h2" or
#: "http/1.1": the bytes inside are whatever the app sends, and the name is what
#: lets a permissive ingress tell a sidecar from an app doing its own TLS (whose
#: ClientHello offers h2/http/1.1 or nothing). Versioned, so a future wire change
#: can be negotiated.
ALPN = b"trio-tproxy/1"


# --- contexts and connections ---------------------------------------------------


class HandshakeNotes:
    """Per-connection facts the verify callback learns (the Connection's app data)."""

    __slots__ = ("presented", "verify_error")

    def __init__(self) -> None:
        self.verify_error: VerifyError | None = None
        #: The peer's own certificate as it reached the verify callback: there
        #: even when the handshake failed and get_peer_certificate has nothing.
        self.presented: crypto.X509 | None = None


def notes(conn: SSL.Connection) -> HandshakeNotes | None:
    data = conn.get_app_data()
    return data if isinstance(data, HandshakeNotes) else None


def _on_verify(conn: SSL.Connection, cert: crypto.X509, code: int, depth: int, ok: int) -> bool:
    # Record, never decide: returning OpenSSL's own verdict keeps the chain
    # check entirely OpenSSL's. Only the first error is kept (it is the cause).
    n = notes(conn)
    if n is not None:
        if depth == 0:
            n.presented = cert
        if not ok and n.verify_error is None:
            n.verify_error = VerifyError(code, ossl.verify_error_text(code), depth)
    return bool(ok)


def _context(creds: Credentials, *, server: bool, groups: str | None) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    if groups is not None:
        # Key-exchange groups, e.g. "X25519:P-256" to leave out the ML-KEM
        # hybrid of OpenSSL's default (less CPU and memory per handshake,
        # no protection against harvest-now-decrypt-later).
        ossl.set_groups(ctx, groups)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_cipher_list(TLS12_CIPHERS)
    options = SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION
    if server:
        options |= SSL.OP_CIPHER_SERVER_PREFERENCE
    ctx.set_options(options)
    # Frees the read/write buffers of idle connections (~34 KiB each); a sidecar
    # holds many idle keep-alive connections.
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    # pyOpenSSL turns on partial writes, so SSL_write returns after every 16 KiB
    # record; without them one call encrypts and sends a whole 256 KiB buffer
    # (a retry after WANT_WRITE passes the same buffer, as OpenSSL requires).
    ossl.clear_partial_write(ctx)

    ctx.use_certificate(creds.cert)
    for extra in creds.chain:
        ctx.add_extra_chain_cert(extra)
    ctx.use_privatekey(creds.key)
    ctx.check_privatekey()

    # Only our CA bundle; never set_default_verify_paths().  The certificates
    # parsed and checked by load_credentials, not the file again: a rotation
    # between the check and a second read would go unchecked.
    store = ctx.get_cert_store()
    assert store is not None  # a new context always has one
    for ca in creds.ca_certs:
        store.add_cert(crypto.X509.from_cryptography(ca))
    mode = SSL.VERIFY_PEER
    if server:
        mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
        for ca in creds.ca_certs:
            ctx.add_client_ca(ca)
        ctx.set_session_id(SESSION_ID_CONTEXT)
        # Tickets (and cached sessions) we issue are good for SESSION_LIFETIME
        # seconds, not OpenSSL's 7200; a resumed session's client certificate
        # is also checked for expiry (verify_client).
        ctx.set_timeout(SESSION_LIFETIME)
        ctx.set_alpn_select_callback(_select_alpn)
    else:
        ctx.set_alpn_protos([ALPN])
    ctx.set_verify(mode, _on_verify)
    return ctx


def _select_alpn(conn: SSL.Connection, offered: list[bytes]) -> bytes | SSL._NoOverlappingProtocols:
    """Server side: agree on our protocol if offered; otherwise go on without ALPN.

    Not offering it is not an error here (an older sidecar): the leg records it.
    """
    return ALPN if ALPN in offered else SSL.NO_OVERLAPPING_PROTOCOLS


def server_context(creds: Credentials, *, groups: str | None = None) -> SSL.Context:
    """The ingress context: client certificate required, chained to our CA bundle.

    Names are checked after the handshake (:func:`verify_client`)."""
    return _context(creds, server=True, groups=groups)


def client_context(creds: Credentials, *, groups: str | None = None) -> SSL.Context:
    """The egress context: server certificate chained to our CA bundle.

    Names are checked after the handshake (:func:`verify_server`)."""
    return _context(creds, server=False, groups=groups)


def new_connection(ctx: SSL.Context, sock: Any, *, server: bool) -> SSL.Connection:
    """A connection for one handshake in the given role.

    ``sock`` is a socket OpenSSL does its own I/O on, or None for memory BIOs
    (what :class:`~trio_tproxy.tlsstream.TLSStream` needs).
    """
    conn = SSL.Connection(ctx, sock)
    conn.set_app_data(HandshakeNotes())
    if server:
        conn.set_accept_state()
    else:
        conn.set_connect_state()
    return conn


# --- after the handshake ---------------------------------------------------------


@dataclass(frozen=True)
class PeerIdentity:
    #: Set only when the policy checked it (spiffe mode).
    spiffe_id: str | None
    #: For log lines.
    description: str
    #: The peer certificate's notAfter (a resumed session must not outlive it).
    not_after: dt.datetime | None = field(default=None, compare=False)


#: A memoized name check: the peer's identity or the refusal's reason, and its notAfter.
_Verdict = tuple[PeerIdentity | str, dt.datetime]


class IdentityMemo:
    """The name check's verdicts by peer certificate, so a peer that comes back
    (a resumed session, or a new full handshake with the same certificate) costs
    a DER encoding and a dict lookup instead of parsing the certificate and its
    SANs again (~20 us).

    Safe because the name check is a pure function of the certificate's bytes,
    the identity policy (fixed for the process: another one empties the memo)
    and, egress in ``ip`` mode, the address dialed.  What is not pure is checked on
    every connection, memo or not: OpenSSL's chain verification (a full
    handshake), the verify callback's note, and the certificate's ``notAfter``
    against the clock (kept with the verdict).  A refusal is remembered as its
    reason and raised again.  Bounded: the oldest verdict goes first.
    """

    __slots__ = ("_policy", "_verdicts", "size")

    def __init__(self, size: int = 256) -> None:
        self.size = size
        #: The policy of the verdicts (one per process: compared by identity, not hashed).
        self._policy: IdentityPolicy | None = None
        #: (DER, dst IP or None) -> (identity or refusal, notAfter); ~1 KB each
        self._verdicts: dict[tuple[bytes, str | None], _Verdict] = {}

    def verify(
        self, conn: SSL.Connection, policy: IdentityPolicy, original_dst_ip: str | None
    ) -> PeerIdentity:
        """:func:`verify_server` (with a ``original_dst_ip``) or :func:`verify_client`."""
        _verify_note(conn)
        peer = conn.get_peer_certificate()
        if peer is None:
            raise IdentityError("no peer certificate")
        der = crypto.dump_certificate(crypto.FILETYPE_ASN1, peer)
        # In spiffe mode the address plays no part: one verdict per certificate.
        dst_ip = original_dst_ip if policy.mode != "spiffe" else None
        key = (der, dst_ip)  # the bytes themselves: exact, and no digest to compute
        if policy is not self._policy:
            self._verdicts.clear()
            self._policy = policy
        verdict = self._verdicts.get(key)
        if verdict is None:
            cert = x509.load_der_x509_certificate(der)
            try:
                found: PeerIdentity | str = _names(cert, policy, original_dst_ip)
            except IdentityError as exc:
                found = str(exc)
            verdict = (found, cert.not_valid_after_utc)
            if len(self._verdicts) >= self.size:
                del self._verdicts[next(iter(self._verdicts))]
            self._verdicts[key] = verdict
        found, not_after = verdict
        _check_expiry(conn, not_after)
        if isinstance(found, str):
            raise IdentityError(found)
        return found

    def __len__(self) -> int:
        return len(self._verdicts)


def _verify_note(conn: SSL.Connection) -> None:
    n = notes(conn)
    if n is not None and n.verify_error is not None:
        # Cannot happen with VERIFY_PEER (the handshake fails first); refuse anyway.
        raise IdentityError(n.verify_error.reason)


def _check_expiry(conn: SSL.Connection, not_after: dt.datetime) -> None:
    # OpenSSL checks the dates in a full handshake only: a resumed session
    # carries the certificate of the handshake it came from, maybe expired since.
    if dt.datetime.now(dt.UTC) > not_after:
        how = " (a resumed session)" if ossl.session_reused(conn) else ""
        raise IdentityError(f"certificate expired on {not_after:%Y-%m-%d %H:%M:%S} UTC{how}")


def _peer_cert(conn: SSL.Connection) -> x509.Certificate:
    _verify_note(conn)
    cert = conn.get_peer_certificate(as_cryptography=True)
    if cert is None:
        raise IdentityError("no peer certificate")
    _check_expiry(conn, cert.not_valid_after_utc)
    return cert


def _names(cert: x509.Certificate, policy: IdentityPolicy, dst_ip: str | None) -> PeerIdentity:
    """The name check: egress when ``dst_ip`` is given (the address dialed), else ingress."""
    if policy.mode == "spiffe":
        spiffe_id = identity.check_spiffe(cert, policy)
        return PeerIdentity(spiffe_id, spiffe_id, cert.not_valid_after_utc)
    if dst_ip is not None:
        return PeerIdentity(None, identity.check_ip(cert, dst_ip), cert.not_valid_after_utc)
    # ip mode: a client has no address to match; its chain was verified.
    return PeerIdentity(None, identity.describe(cert), cert.not_valid_after_utc)


def verify_server(
    conn: SSL.Connection, policy: IdentityPolicy, original_dst_ip: str
) -> PeerIdentity:
    """Egress: is the server we reached the one we meant? Raises IdentityError."""
    return _names(_peer_cert(conn), policy, original_dst_ip)


def verify_client(conn: SSL.Connection, policy: IdentityPolicy) -> PeerIdentity:
    """Ingress: may this client talk to us? Raises IdentityError."""
    return _names(_peer_cert(conn), policy, None)


@dataclass(frozen=True)
class TLSLeg:
    """A TLS connection past its handshake and identity check, ready to relay."""

    stream: TLSStream
    peer: PeerIdentity
    #: e.g. "TLSv1.3"
    version: str
    #: e.g. "TLS_AES_256_GCM_SHA384"
    cipher: str
    #: Whether the handshake resumed a session (None: cannot tell, see ossl).
    resumed: bool | None
    #: Whether both sides agreed on :data:`ALPN` (server: the client offered it).
    alpn: bool = False

    @property
    def info(self) -> str:
        """e.g. ``"TLSv1.3 TLS_AES_256_GCM_SHA384"``."""
        return f"{self.version} {self.cipher}"


class HandshakeFailed(Exception):
    """The handshake or the identity check refused the peer; ``str()`` says why.

    ``stream`` is still open: the caller closes it (``close_after_alert()``
    when ``alert_sent``, so the peer reads our alert; otherwise ``abort()``).
    """

    def __init__(self, reason: str, stream: TLSStream, *, alert_sent: bool) -> None:
        super().__init__(reason)
        self.stream = stream
        self.alert_sent = alert_sent


def leg_info(conn: SSL.Connection) -> tuple[str, str, bool | None]:
    return (
        conn.get_protocol_version_name(),
        conn.get_cipher_name() or "(no cipher)",
        ossl.session_reused(conn),
    )


def tls_info(conn: SSL.Connection) -> str:
    """e.g. ``"TLSv1.3 TLS_AES_256_GCM_SHA384"``."""
    version, cipher, _ = leg_info(conn)
    return f"{version} {cipher}"


def presented(conn: SSL.Connection) -> str:
    """The certificate the peer presented, named for a log line, or "no certificate"."""
    try:
        cert: x509.Certificate | None = conn.get_peer_certificate(as_cryptography=True)
    except SSL.Error:
        cert = None
    if cert is None:
        n = notes(conn)
        if n is not None and n.presented is not None:
            cert = n.presented.to_cryptography()
    return identity.describe_presented(cert) if cert is not None else "no certificate"


def explain_failure(exc: BaseException, conn: SSL.Connection | None) -> str:
    """A short reason for a failed handshake, preferring the verify callback's note."""
    n = notes(conn) if conn is not None else None
    return explain(exc, n.verify_error if n is not None else None)


async def _handshake(
    stream: TLSStream, handshake_timeout: float, verify: Callable[[], PeerIdentity]
) -> TLSLeg:
    conn = stream.conn
    try:
        # A cancel scope with a deadline is trio.fail_after without its
        # generator-based context manager (~3 us a connection).
        with trio.CancelScope(deadline=trio.current_time() + handshake_timeout) as deadline:
            await stream.do_handshake()
        if deadline.cancelled_caught:
            raise HandshakeFailed(
                f"TLS handshake timed out after {handshake_timeout:g}s", stream, alert_sent=False
            )
        peer = verify()
    except IdentityError as exc:
        raise HandshakeFailed(
            f"identity rejected: {exc} (presented {presented(conn)})", stream, alert_sent=False
        ) from None
    except trio.BrokenResourceError as exc:
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        raise HandshakeFailed(
            f"TLS handshake failed: {explain_failure(cause, conn)} (presented {presented(conn)})",
            stream,
            alert_sent=True,
        ) from None
    return TLSLeg(stream, peer, *leg_info(conn), alpn=conn.get_alpn_proto_negotiated() == ALPN)


async def connect(
    ctx: SSL.Context,
    sock: trio.socket.SocketType,
    policy: IdentityPolicy,
    dst: tuple[str, int],
    *,
    handshake_timeout: float,
    sessions: SessionCache | None = None,
    memo: IdentityMemo | None = None,
) -> TLSLeg:
    """Egress: TLS client on the connected ``sock`` towards ``dst``; HandshakeFailed if refused.

    ``sock`` belongs to the stream from the start: on HandshakeFailed it is
    ``exc.stream``'s; on any other exception (cancellation) it is aborted here.
    ``memo``: remembers name checks by certificate (see :class:`IdentityMemo`).
    """
    stream = TLSStream(sock, new_connection(ctx, sock, server=False))
    if sessions is not None:
        sessions.offer(stream.conn, dst)

    def verify() -> PeerIdentity:
        if memo is None:
            return verify_server(stream.conn, policy, dst[0])
        return memo.verify(stream.conn, policy, dst[0])

    try:
        return await _handshake(stream, handshake_timeout, verify)
    except HandshakeFailed:
        raise  # the stream is the caller's to close (see HandshakeFailed)
    except BaseException:
        await _abort_shielded(stream)  # cancelled, or a bug: nobody else holds it
        raise


async def accept(
    ctx: SSL.Context,
    sock: trio.socket.SocketType,
    policy: IdentityPolicy,
    *,
    handshake_timeout: float,
    memo: IdentityMemo | None = None,
) -> TLSLeg:
    """Ingress: TLS server on the accepted ``sock``; HandshakeFailed if refused (see connect).

    ``memo``: remembers name checks by certificate (see :class:`IdentityMemo`)."""
    stream = TLSStream(sock, new_connection(ctx, sock, server=True))

    def verify() -> PeerIdentity:
        if memo is None:
            return verify_client(stream.conn, policy)
        return memo.verify(stream.conn, policy, None)

    try:
        return await _handshake(stream, handshake_timeout, verify)
    except HandshakeFailed:
        raise  # the stream is the caller's to close (see HandshakeFailed)
    except BaseException:
        await _abort_shielded(stream)  # cancelled, or a bug: nobody else holds it
        raise


async def _abort_shielded(stream: TLSStream) -> None:
    with trio.CancelScope(shield=True):
        await stream.abort()


def keep_session(sessions: SessionCache, leg: TLSLeg, dst: tuple[str, int]) -> None:
    """After a connection went well: remember its session for the next one to ``dst``."""
    if leg.peer.not_after is not None:
        sessions.keep(leg.stream.conn, dst, leg.peer.not_after, resumed=bool(leg.resumed))
