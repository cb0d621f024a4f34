"""TLS policy: our credentials, the pyOpenSSL contexts, and the checks after a handshake.

Why one module: every security decision about TLS is here and nowhere else, so
it can be read (and tested with real handshakes) in one place. The stream that
drives a handshake over trio lives in :mod:`trio_tproxy.tlsstream`; it knows
nothing about certificates.

The decisions:

* Credentials come from files only (no built-in key, ever) and are checked at
  startup: each problem is one :class:`ConfigError` line naming the file.
* Both contexts trust only the configured CA bundle (never the system roots:
  a public CA must not be able to mint a mesh identity). TLS 1.2 is the floor,
  1.3 is preferred; TLS 1.2 is limited to ECDHE with AEAD ciphers. No
  compression, no renegotiation. ``OP_IGNORE_UNEXPECTED_EOF`` is deliberately
  not set: a FIN without close_notify must stay visible as truncation.
* The server requires a client certificate; the client requires a server
  certificate. OpenSSL checks the chain and dates; names are checked after the
  handshake by :mod:`trio_tproxy.identity` (pyOpenSSL has no name check).
* OpenSSL's own error for a refused chain is just "certificate verify failed".
  A verify callback keeps the first X.509 error per connection in a
  :class:`HandshakeNotes` (the Connection's app data), so :func:`explain` can
  say "unknown CA" or "certificate expired" in the log line instead.
"""

from __future__ import annotations

import datetime as dt
import errno
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import SSL, crypto

from . import identity
from .certs import SigningKey, key_matches, read_certs, read_key, signing_key
from .config import ConfigError, IdentityPolicy, TLSFiles
from .identity import IdentityError

#: TLS 1.2 only (TLS 1.3 suites are all AEAD and set separately): forward
#: secrecy and authenticated encryption, nothing else.
TLS12_CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20"
#: Lets a server with client authentication accept session resumption
#: (without it OpenSSL aborts such a handshake with an internal error).
SESSION_ID_CONTEXT = b"trio-tproxy"

_CREATE_HINT = (
    " (create one with `trio-tproxy certs ca --out DIR` then `trio-tproxy certs issue"
    " --ca-dir DIR --out DIR --name NAME --spiffe-id spiffe://TRUST-DOMAIN/ns/NS/sa/SA`)"
)
_CREATE_CA_HINT = " (create one with `trio-tproxy certs ca --out DIR`, or use your cluster's CA)"


# --- credentials -------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """Our certificate chain, key and trusted CAs, parsed and checked once."""

    files: TLSFiles
    #: Our leaf certificate (the first one in ``files.cert``).
    cert: x509.Certificate
    #: Its SPIFFE ID, when it carries exactly one.
    spiffe_id: str | None
    not_after: dt.datetime
    #: Intermediates that followed the leaf in ``files.cert``.
    chain: tuple[x509.Certificate, ...]
    key: SigningKey = field(repr=False)
    ca_certs: tuple[x509.Certificate, ...] = field(repr=False)


def load_credentials(files: TLSFiles, *, now: dt.datetime | None = None) -> Credentials:
    """Read and check our certificate, key and CA bundle; ConfigError names the bad file."""
    now = now or dt.datetime.now(dt.UTC)
    if now.tzinfo is None:  # naive means UTC, as in cryptography
        now = now.replace(tzinfo=dt.UTC)
    certs = read_certs(files.cert, what="certificate file", hint=_CREATE_HINT)
    key = signing_key(read_key(files.key, what="key file", hint=_CREATE_HINT), files.key)
    cas = read_certs(files.ca_cert, what="CA file", hint=_CREATE_CA_HINT)
    leaf = certs[0]
    if not key_matches(leaf, key):
        raise ConfigError(f"key file {files.key} does not match certificate {files.cert}")
    _check_dates(leaf, now, f"certificate file {files.cert}")
    _check_eku(leaf, files)
    if all(ca.not_valid_after_utc < now for ca in cas):
        raise ConfigError(
            f"CA file {files.ca_cert}: every certificate has expired "
            f"(latest on {_fmt(max(ca.not_valid_after_utc for ca in cas))})"
        )
    ids = identity.spiffe_ids(leaf)
    return Credentials(
        files=files,
        cert=leaf,
        spiffe_id=ids[0] if len(ids) == 1 else None,
        not_after=leaf.not_valid_after_utc,
        chain=tuple(certs[1:]),
        key=key,
        ca_certs=tuple(cas),
    )


def _check_dates(cert: x509.Certificate, now: dt.datetime, what: str) -> None:
    if now > cert.not_valid_after_utc:
        raise ConfigError(f"{what}: certificate expired on {_fmt(cert.not_valid_after_utc)}")
    if now < cert.not_valid_before_utc:
        raise ConfigError(
            f"{what}: certificate not yet valid (from {_fmt(cert.not_valid_before_utc)})"
        )


def _check_eku(cert: x509.Certificate, files: TLSFiles) -> None:
    # Each sidecar is a TLS server (ingress) and a client (egress): a certificate
    # restricted to one role would fail half the traffic, at the peers, later.
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return  # no EKU means any purpose
    except ValueError as exc:
        raise ConfigError(f"certificate file {files.cert}: malformed extensions: {exc}") from None
    for oid, role in (
        (ExtendedKeyUsageOID.SERVER_AUTH, "serverAuth"),
        (ExtendedKeyUsageOID.CLIENT_AUTH, "clientAuth"),
    ):
        if oid not in usages:
            raise ConfigError(
                f"certificate file {files.cert}: extended key usage lacks {role}"
                " (a sidecar is both TLS server and client)"
            )


def _fmt(when: dt.datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M:%S UTC")


# --- contexts and connections ---------------------------------------------------


@dataclass(frozen=True)
class VerifyError:
    """The first X.509 error OpenSSL met while checking the peer's chain."""

    code: int
    text: str
    #: 0 is the peer's own certificate, 1 its issuer, ...
    depth: int

    @property
    def reason(self) -> str:
        return _VERIFY_REASONS.get(self.code, f"certificate verify failed: {self.text}")


# X509_V_ERR_* codes (stable across OpenSSL versions) -> the reasons we log.
_VERIFY_REASONS = {
    2: "unknown CA",  # unable to get issuer certificate
    9: "certificate not yet valid",
    10: "certificate expired",
    18: "unknown CA",  # self-signed certificate
    19: "unknown CA",  # self-signed certificate in chain
    20: "unknown CA",  # unable to get local issuer certificate
    21: "unknown CA",  # unable to verify the first certificate
}


class HandshakeNotes:
    """Per-connection facts the verify callback learns (the Connection's app data)."""

    __slots__ = ("verify_error",)

    def __init__(self) -> None:
        self.verify_error: VerifyError | None = None


def notes(conn: SSL.Connection) -> HandshakeNotes | None:
    data = conn.get_app_data()
    return data if isinstance(data, HandshakeNotes) else None


def _on_verify(conn: SSL.Connection, cert: crypto.X509, code: int, depth: int, ok: int) -> bool:
    # Record, never decide: returning OpenSSL's own verdict keeps the chain
    # check entirely OpenSSL's. Only the first error is kept (it is the cause).
    if not ok:
        n = notes(conn)
        if n is not None and n.verify_error is None:
            n.verify_error = VerifyError(code, _verify_text(code), depth)
    return bool(ok)


def _verify_text(code: int) -> str:
    try:
        lib: Any = SSL._lib  # type: ignore[attr-defined]
        ffi: Any = SSL._ffi  # type: ignore[attr-defined]
        return str(ffi.string(lib.X509_verify_cert_error_string(code)).decode("ascii", "replace"))
    except (AttributeError, TypeError):  # private bindings moved: the number still helps
        return f"X509 error {code}"


#: pyOpenSSL's cffi binding, for the few calls it has no public name for
#: (clear_mode, set1_groups, session_reused).
_LIB: Any = getattr(SSL, "_lib")  # noqa: B009


def _context(creds: Credentials, *, server: bool, groups: str | None) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    if groups is not None:
        # Key-exchange groups, e.g. "X25519:P-256" to leave out the ML-KEM
        # hybrid of OpenSSL's default (less CPU and memory per handshake,
        # no protection against harvest-now-decrypt-later).
        if _LIB.SSL_CTX_set1_curves_list(ctx._context, groups.encode()) != 1:
            raise ConfigError(f"invalid --tls-groups {groups!r}: OpenSSL rejected it")
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
    _LIB.SSL_CTX_clear_mode(ctx._context, _LIB.SSL_MODE_ENABLE_PARTIAL_WRITE)

    ctx.use_certificate(creds.cert)
    for extra in creds.chain:
        ctx.add_extra_chain_cert(extra)
    ctx.use_privatekey(creds.key)
    ctx.check_privatekey()

    # Only our CA bundle; never set_default_verify_paths().
    ctx.load_verify_locations(str(creds.files.ca_cert))
    mode = SSL.VERIFY_PEER
    if server:
        mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
        for ca in creds.ca_certs:
            ctx.add_client_ca(ca)
        ctx.set_session_id(SESSION_ID_CONTEXT)
    ctx.set_verify(mode, _on_verify)
    return ctx


def server_context(
    creds: Credentials, policy: IdentityPolicy, *, groups: str | None = None
) -> SSL.Context:
    """The ingress context: client certificate required, chained to our CA bundle."""
    del policy  # names are checked after the handshake (verify_client)
    return _context(creds, server=True, groups=groups)


def client_context(
    creds: Credentials, policy: IdentityPolicy, *, groups: str | None = None
) -> SSL.Context:
    """The egress context: server certificate chained to our CA bundle."""
    del policy  # names are checked after the handshake (verify_server)
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


def _peer_cert(conn: SSL.Connection) -> x509.Certificate:
    n = notes(conn)
    if n is not None and n.verify_error is not None:
        # Cannot happen with VERIFY_PEER (the handshake fails first); refuse anyway.
        raise IdentityError(n.verify_error.reason)
    cert = conn.get_peer_certificate(as_cryptography=True)
    if cert is None:
        raise IdentityError("no peer certificate")
    return cert


def verify_server(
    conn: SSL.Connection, policy: IdentityPolicy, original_dst_ip: str
) -> PeerIdentity:
    """Egress: is the server we reached the one we meant? Raises IdentityError."""
    cert = _peer_cert(conn)
    if policy.mode == "spiffe":
        spiffe_id = identity.check_spiffe(cert, policy)
        return PeerIdentity(spiffe_id, spiffe_id)
    return PeerIdentity(None, identity.check_ip(cert, original_dst_ip))


def verify_client(conn: SSL.Connection, policy: IdentityPolicy) -> PeerIdentity:
    """Ingress: may this client talk to us? Raises IdentityError."""
    cert = _peer_cert(conn)
    if policy.mode == "spiffe":
        spiffe_id = identity.check_spiffe(cert, policy)
        return PeerIdentity(spiffe_id, spiffe_id)
    # ip mode: a client has no address to match; its chain was verified.
    return PeerIdentity(None, identity.describe(cert))


def session_reused(conn: SSL.Connection) -> bool:
    """Whether the handshake resumed a session (pyOpenSSL has no public name)."""
    return bool(_LIB.SSL_session_reused(conn._ssl))


class SessionCache:
    """TLS sessions to resume, one per original destination, most recent first.

    Resumption skips the certificate signature and chain verification of a
    full handshake (the larger part of its CPU).  The session still carries
    the peer's certificate, whose identity is checked again on every
    connection; the server bounds a session's life (OpenSSL: 300 s).
    """

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._sessions: OrderedDict[tuple[str, int], SSL.Session] = OrderedDict()

    def offer(self, conn: SSL.Connection, dst: tuple[str, int]) -> None:
        """Before the handshake: propose the last session with ``dst``, if any."""
        session = self._sessions.get(dst)
        if session is not None:
            conn.set_session(session)

    def keep(self, conn: SSL.Connection, dst: tuple[str, int]) -> None:
        """After a connection to ``dst`` went well: remember its newest session."""
        if self.size <= 0:
            return
        session = conn.get_session()
        if session is None:
            return
        self._sessions[dst] = session
        self._sessions.move_to_end(dst)
        while len(self._sessions) > self.size:
            self._sessions.popitem(last=False)

    def __len__(self) -> int:
        return len(self._sessions)


def tls_info(conn: SSL.Connection) -> str:
    """e.g. ``"TLSv1.3 TLS_AES_256_GCM_SHA384"``."""
    return f"{conn.get_protocol_version_name()} {conn.get_cipher_name() or '(no cipher)'}"


# --- explaining failures ---------------------------------------------------------------

_ALERT = re.compile(r"^(?:sslv3|tlsv1|tlsv13|tls) alert ")
_REASONS = {
    "peer did not return a certificate": "no client certificate",
    "http request": "plaintext HTTP on TLS port",
    "https proxy request": "plaintext HTTP on TLS port",
    "wrong version number": "not TLS",
    "packet length too long": "not TLS",
    "unknown protocol": "not TLS",
    "unsupported protocol": "TLS version not supported",
    "no protocols available": "TLS version not supported",
    "unsupported version": "TLS version not supported",
    "version too low": "TLS version not supported",
}


def explain(exc: BaseException, conn: SSL.Connection | None) -> str:
    """A short reason for a failed handshake or identity check, for one log line."""
    exc = _innermost(exc)
    if isinstance(exc, IdentityError):
        return str(exc)
    n = notes(conn) if conn is not None else None
    if n is not None and n.verify_error is not None:
        return n.verify_error.reason
    if isinstance(exc, SSL.ZeroReturnError):
        return "peer closed during handshake"
    if isinstance(exc, SSL.SysCallError):
        return _explain_syscall(exc)
    if isinstance(exc, SSL.Error):
        return _explain_openssl(exc)
    if isinstance(exc, OSError):
        return _explain_errno(exc.errno, exc.strerror or str(exc))
    return str(exc) or type(exc).__name__


def _innermost(exc: BaseException) -> BaseException:
    # The TLS stream re-raises OpenSSL/OS errors as trio errors "from" them.
    seen = 0
    while (
        not isinstance(exc, SSL.Error | OSError | IdentityError)
        and exc.__cause__ is not None
        and seen < 10
    ):
        exc, seen = exc.__cause__, seen + 1
    return exc


def _explain_syscall(exc: SSL.SysCallError) -> str:
    code, text = (exc.args + (None, None))[:2]
    if code == -1:  # EOF without close_notify ('Unexpected EOF')
        return "peer closed during handshake"
    return _explain_errno(code if isinstance(code, int) else None, str(text))


def _explain_errno(code: int | None, text: str) -> str:
    if code == errno.ECONNRESET:
        return "connection reset during handshake"
    if code == errno.EPIPE:
        return "peer closed during handshake"
    return text


def _explain_openssl(exc: SSL.Error) -> str:
    reasons = _reasons(exc)
    for reason in reasons:
        if reason in _REASONS:
            return _REASONS[reason]
        if _ALERT.match(reason):
            return f"peer alert: {reason}"
    return reasons[0] if reasons else str(exc) or "TLS error"


def _reasons(exc: SSL.Error) -> list[str]:
    # pyOpenSSL: args[0] is OpenSSL's error queue, [(library, function, reason), ...].
    queue = exc.args[0] if exc.args else None
    if not isinstance(queue, list):
        return []
    return [str(item[-1]) for item in queue if isinstance(item, tuple) and item]
