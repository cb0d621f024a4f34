"""tlspolicy: real handshakes between two pyOpenSSL connections over loopback TCP.

Each side runs in its own thread on a non-blocking socket, retried with select()
like the trio stream does with wait_readable/wait_writable. After the handshake
the server reads "ping" and answers "pong": in TLS 1.3 the client finishes its
handshake before the server has checked the client certificate, so a refusal
only reaches the client on its first read.
"""

from __future__ import annotations

import datetime as dt
import select
import socket
import threading
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL

import lab.pki
from trio_tproxy import certs, tlspolicy
from trio_tproxy.config import ConfigError, IdentityPolicy, TLSFiles
from trio_tproxy.credentials import Credentials, load_credentials
from trio_tproxy.identity import IdentityError
from trio_tproxy.kernel import set_abort_on_close
from trio_tproxy.tlspolicy import (
    ALPN,
    IdentityMemo,
    PeerIdentity,
    client_context,
    explain_failure,
    new_connection,
    notes,
    server_context,
    tls_info,
    verify_client,
    verify_server,
)

T = TypeVar("T")
NOW = dt.datetime.now(dt.UTC)
SPIFFE = IdentityPolicy(mode="spiffe", trust_domain="cluster.local")
IP_MODE = IdentityPolicy(mode="ip", trust_domain="cluster.local")
WEB = "spiffe://cluster.local/ns/default/sa/web"
DB = "spiffe://cluster.local/ns/default/sa/db"


# --- certificates in tmp_path ---------------------------------------------------------


class PKI(lab.pki.PKI):
    """The lab's CA, issuing credentials through the real file loaders."""

    def creds(self, name: str, *, now: dt.datetime | None = None, **issue: Any) -> Credentials:
        # `now` lets a test load an expired certificate to offer it to a peer.
        return load_credentials(self.issue(name, **issue), now=now)


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    return PKI(tmp_path, common_name="ca CA")


@pytest.fixture
def other_pki(tmp_path: Path) -> PKI:
    return PKI(tmp_path, "other", common_name="other CA")


# --- driving two connections --------------------------------------------------------------


def _retry(conn: SSL.Connection, sock: socket.socket, fn: Callable[[], T]) -> T:
    deadline = time.monotonic() + 10
    while True:
        try:
            return fn()
        except SSL.WantReadError:
            readable, writable = [sock], []
        except SSL.WantWriteError:
            readable, writable = [], [sock]
        left = deadline - time.monotonic()
        if left <= 0 or not any(select.select(readable, writable, [], left)):
            raise TimeoutError("test handshake stuck")


def _close(sock: socket.socket) -> None:
    # Closing with unread input makes the kernel send RST, which can overtake
    # our alert; a lingering close lets the peer read the alert first.
    try:
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and select.select([sock], [], [], 0.2)[0]:
            if not sock.recv(65536):
                break
    except OSError:
        pass
    sock.close()


@dataclass
class Side:
    conn: SSL.Connection | None = None
    peer: PeerIdentity | None = None
    error: BaseException | None = None
    info: str = ""
    got: bytes = b""

    @property
    def reason(self) -> str:
        assert self.error is not None, "this side succeeded"
        return explain_failure(self.error, self.conn)


@dataclass
class Result:
    server: Side = field(default_factory=Side)
    client: Side = field(default_factory=Side)


def run_pair(
    server_ctx: SSL.Context,
    client_ctx: SSL.Context | None,
    *,
    server_policy: IdentityPolicy = SPIFFE,
    client_policy: IdentityPolicy = SPIFFE,
    dst_ip: str = "127.0.0.1",
    raw: bytes | None = None,
    reset: bool = False,
) -> Result:
    """One connection: a TLS server thread and either a TLS client or raw bytes."""
    result = Result()
    listener = socket.create_server(("127.0.0.1", 0))

    def server() -> None:
        side = result.server
        sock, _ = listener.accept()
        sock.setblocking(False)
        try:
            side.conn = conn = new_connection(server_ctx, sock, server=True)
            _retry(conn, sock, conn.do_handshake)
            side.peer = verify_client(conn, server_policy)
            side.info = tls_info(conn)
            side.got = _retry(conn, sock, lambda: conn.recv(4))
            _retry(conn, sock, lambda: conn.sendall(b"pong"))
        except Exception as exc:
            side.error = exc
        finally:
            _close(sock)

    thread = threading.Thread(target=server)
    thread.start()
    try:
        sock = socket.create_connection(listener.getsockname())
        if client_ctx is None:
            if raw:
                sock.sendall(raw)
            if reset:  # close() sends RST instead of FIN
                set_abort_on_close(sock)
            else:
                time.sleep(0.1)  # let the server read before the FIN
            sock.close()
        else:
            _client(client_ctx, sock, result.client, client_policy, dst_ip)
    finally:
        thread.join(15)
        listener.close()
    assert not thread.is_alive()
    return result


def _client(
    ctx: SSL.Context, sock: socket.socket, side: Side, policy: IdentityPolicy, dst_ip: str
) -> None:
    sock.setblocking(False)
    try:
        side.conn = conn = new_connection(ctx, sock, server=False)
        _retry(conn, sock, conn.do_handshake)
        side.peer = verify_server(conn, policy, dst_ip)
        side.info = tls_info(conn)
        _retry(conn, sock, lambda: conn.sendall(b"ping"))
        side.got = _retry(conn, sock, lambda: conn.recv(4))
    except Exception as exc:
        side.error = exc
    finally:
        _close(sock)


def handshake(
    server: Credentials,
    client: Credentials,
    *,
    server_policy: IdentityPolicy = SPIFFE,
    client_policy: IdentityPolicy = SPIFFE,
    dst_ip: str = "127.0.0.1",
) -> Result:
    return run_pair(
        server_context(server),
        client_context(client),
        server_policy=server_policy,
        client_policy=client_policy,
        dst_ip=dst_ip,
    )


# --- the good path ---------------------------------------------------------------------


def test_mutual_tls13_handshake_verifies_both_identities(pki: PKI) -> None:
    r = handshake(pki.creds("db", spiffe_ids=[DB]), pki.creds("web", spiffe_ids=[WEB]))
    assert r.server.error is None and r.client.error is None
    assert r.server.peer == PeerIdentity(WEB, WEB)
    assert r.client.peer == PeerIdentity(DB, DB)
    assert r.client.info.startswith("TLSv1.3 TLS_")
    assert r.server.got == b"ping" and r.client.got == b"pong"


def test_sidecars_agree_on_our_alpn_and_a_client_without_it_is_recorded(pki: PKI) -> None:
    r = handshake(pki.creds("db", spiffe_ids=[DB]), pki.creds("web", spiffe_ids=[WEB]))
    assert r.server.conn is not None and r.client.conn is not None
    assert r.server.conn.get_alpn_proto_negotiated() == ALPN == b"trio-tproxy/1"
    assert r.client.conn.get_alpn_proto_negotiated() == ALPN
    # An older sidecar (or any client) offering other protocols: no agreement, no failure.
    ctx = client_context(pki.creds("web", spiffe_ids=[WEB]))
    ctx.set_alpn_protos([b"h2"])
    r = run_pair(server_context(pki.creds("db", spiffe_ids=[DB])), ctx)
    assert r.server.error is None and r.client.error is None
    assert r.server.conn is not None and r.server.conn.get_alpn_proto_negotiated() == b""


def test_tls12_peer_gets_ecdhe_aead_cipher(pki: PKI) -> None:
    ctx = client_context(pki.creds("web", spiffe_ids=[WEB]))
    ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    r = run_pair(server_context(pki.creds("db", spiffe_ids=[DB])), ctx)
    assert r.client.error is None
    version, cipher = r.client.info.split()
    assert version == "TLSv1.2"
    assert cipher.startswith("ECDHE-") and ("GCM" in cipher or "CHACHA20" in cipher)


def test_context_settings(pki: PKI) -> None:
    creds = pki.creds("web", spiffe_ids=[WEB])
    server, client = server_context(creds), client_context(creds)
    for ctx in (server, client):
        options = ctx.set_options(0)  # returns the options in force
        assert options & SSL.OP_NO_COMPRESSION
        assert options & SSL.OP_NO_RENEGOTIATION
        # Truncation (FIN without close_notify) must stay visible.
        assert not options & SSL.OP_IGNORE_UNEXPECTED_EOF
        assert ctx.set_mode(0) & SSL._lib.SSL_MODE_RELEASE_BUFFERS  # type: ignore[attr-defined]
    assert server.set_options(0) & SSL.OP_CIPHER_SERVER_PREFERENCE
    assert server.get_verify_mode() == SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT
    assert client.get_verify_mode() == SSL.VERIFY_PEER


def test_server_advertises_our_ca_for_client_certificates(pki: PKI) -> None:
    conn = new_connection(server_context(pki.creds("db", dns=["db"])), None, server=True)
    names = conn.get_client_ca_list()
    assert [n.CN for n in names] == ["ca CA"]


def test_new_connection_attaches_fresh_notes(pki: PKI) -> None:
    ctx = client_context(pki.creds("web", dns=["web"]))
    a, b = new_connection(ctx, None, server=False), new_connection(ctx, None, server=False)
    notes_a, notes_b = notes(a), notes(b)
    assert notes_a is not None and notes_b is not None and notes_a is not notes_b
    assert notes_a.verify_error is None


# --- chain and date failures ---------------------------------------------------------


def test_client_without_certificate_is_rejected(pki: PKI) -> None:
    bare = SSL.Context(SSL.TLS_METHOD)
    bare.load_verify_locations(str(pki.ca_path))
    bare.set_verify(SSL.VERIFY_PEER)
    r = run_pair(server_context(pki.creds("db", spiffe_ids=[DB])), bare)
    assert r.server.reason == "no client certificate"
    assert r.server.peer is None
    # TLS 1.3: the client learns it only on its first read, from the alert.
    assert r.client.reason == "peer alert: tlsv13 alert certificate required"


def test_client_certificate_from_another_ca_is_unknown_ca(pki: PKI, other_pki: PKI) -> None:
    r = handshake(
        pki.creds("db", spiffe_ids=[DB]), other_pki.creds("web", spiffe_ids=[WEB], trust=pki)
    )
    assert r.server.reason == "unknown CA"
    assert r.server.peer is None
    verify_error = notes(r.server.conn).verify_error  # type: ignore[union-attr,arg-type]
    assert verify_error is not None and verify_error.code == 20 and verify_error.depth == 0
    assert verify_error.text == "unable to get local issuer certificate"
    assert r.client.reason == "peer alert: tlsv1 alert unknown ca"


def test_server_certificate_from_another_ca_is_unknown_ca(pki: PKI, other_pki: PKI) -> None:
    r = handshake(
        other_pki.creds("db", spiffe_ids=[DB], trust=pki), pki.creds("web", spiffe_ids=[WEB])
    )
    assert r.client.reason == "unknown CA"
    assert r.client.peer is None
    assert r.server.reason == "peer alert: tlsv1 alert unknown ca"


def test_expired_server_certificate(pki: PKI) -> None:
    past = NOW - dt.timedelta(days=10)
    expired = pki.creds(
        "db",
        spiffe_ids=[DB],
        not_before=past,
        not_after=NOW - dt.timedelta(days=1),
        now=past + dt.timedelta(hours=1),
    )
    r = handshake(expired, pki.creds("web", spiffe_ids=[WEB]))
    assert r.client.reason == "certificate expired"
    assert r.client.peer is None
    assert r.server.reason.startswith("peer alert: ")
    assert "certificate expired" in r.server.reason


def test_expired_client_certificate(pki: PKI) -> None:
    past = NOW - dt.timedelta(days=10)
    expired = pki.creds(
        "web",
        spiffe_ids=[WEB],
        not_before=past,
        not_after=NOW - dt.timedelta(days=1),
        now=past + dt.timedelta(hours=1),
    )
    r = handshake(pki.creds("db", spiffe_ids=[DB]), expired)
    assert r.server.reason == "certificate expired"
    assert r.server.peer is None


def test_not_yet_valid_server_certificate(pki: PKI) -> None:
    start = NOW + dt.timedelta(days=1)
    future = pki.creds(
        "db",
        spiffe_ids=[DB],
        not_before=start,
        not_after=start + dt.timedelta(days=1),
        now=start + dt.timedelta(hours=1),
    )
    r = handshake(future, pki.creds("web", spiffe_ids=[WEB]))
    assert r.client.reason == "certificate not yet valid"
    assert r.server.reason.startswith("peer alert: ")


# --- identity failures after a good handshake --------------------------------------------


def test_wrong_trust_domain_is_refused_by_the_server(pki: PKI) -> None:
    r = handshake(
        pki.creds("db", spiffe_ids=[DB]), pki.creds("web", spiffe_ids=["spiffe://evil.org/web"])
    )
    assert isinstance(r.server.error, IdentityError)
    assert r.server.reason == "wrong trust domain 'evil.org' (want 'cluster.local')"
    assert r.client.error is not None  # the server hung up before "pong"
    assert r.client.got == b""


def test_wrong_trust_domain_is_refused_by_the_client(pki: PKI) -> None:
    r = handshake(
        pki.creds("db", spiffe_ids=["spiffe://evil.org/db"]), pki.creds("web", spiffe_ids=[WEB])
    )
    assert isinstance(r.client.error, IdentityError)
    assert r.client.reason == "wrong trust domain 'evil.org' (want 'cluster.local')"


def test_several_uri_sans_are_refused(pki: PKI) -> None:
    r = handshake(pki.creds("db", spiffe_ids=[DB]), pki.creds("web", spiffe_ids=[WEB, DB]))
    assert r.server.reason.startswith("several URI SANs")


def test_allow_list_prefix(pki: PKI) -> None:
    policy = IdentityPolicy(allow_ids=("spiffe://cluster.local/ns/default/",))
    db = pki.creds("db", spiffe_ids=[DB])
    ok = handshake(db, pki.creds("web", spiffe_ids=[WEB]), server_policy=policy)
    assert ok.server.peer == PeerIdentity(WEB, WEB)
    evil = "spiffe://cluster.local/ns/defaultx/sa/web"
    bad = handshake(db, pki.creds("evil", spiffe_ids=[evil]), server_policy=policy)
    assert bad.server.reason == f"SPIFFE ID not in allow-list: {evil!r}"


def test_allow_list_exact(pki: PKI) -> None:
    policy = IdentityPolicy(allow_ids=(WEB,))
    db = pki.creds("db", spiffe_ids=[DB])
    assert handshake(db, pki.creds("web", spiffe_ids=[WEB]), server_policy=policy).server.peer
    other = handshake(db, pki.creds("db2", spiffe_ids=[DB]), server_policy=policy)
    assert other.server.reason.startswith("SPIFFE ID not in allow-list")


def test_ip_mode_server_matches_original_destination(pki: PKI) -> None:
    server = pki.creds("db", ips=["127.0.0.1", "10.0.0.2"])
    client = pki.creds("web", dns=["web.default.svc"])
    r = handshake(server, client, server_policy=IP_MODE, client_policy=IP_MODE, dst_ip="10.0.0.2")
    assert r.client.peer == PeerIdentity(None, "IP 127.0.0.1, 10.0.0.2")
    # In ip mode a client is only chain-verified, and described for the log.
    assert r.server.peer == PeerIdentity(None, "DNS web.default.svc")


def test_ip_mode_server_mismatch(pki: PKI) -> None:
    server = pki.creds("db", ips=["10.0.0.3"])
    client = pki.creds("web", ips=["10.0.0.9"])
    r = handshake(server, client, server_policy=IP_MODE, client_policy=IP_MODE, dst_ip="10.0.0.2")
    assert r.client.reason == "IP SAN mismatch: want 10.0.0.2, certificate has [10.0.0.3]"
    assert r.client.peer is None


# --- the name checks remembered by certificate (IdentityMemo) ------------------------------


def test_identity_memo_agrees_with_the_checks_and_remembers(pki: PKI) -> None:
    r = handshake(pki.creds("db", spiffe_ids=[DB]), pki.creds("web", spiffe_ids=[WEB]))
    assert r.server.conn is not None and r.client.conn is not None
    memo = IdentityMemo()
    for _ in range(2):
        assert memo.verify(r.client.conn, SPIFFE, "127.0.0.1") == r.client.peer
        assert memo.verify(r.server.conn, SPIFFE, None) == r.server.peer
    assert len(memo) == 2  # one verdict per certificate, the second round from the memo
    # In spiffe mode the address dialed plays no part: still one verdict for db.
    assert memo.verify(r.client.conn, SPIFFE, "10.0.0.9") == PeerIdentity(DB, DB)
    assert len(memo) == 2


def test_identity_memo_ip_mode_checks_each_address(pki: PKI) -> None:
    server = pki.creds("db", ips=["127.0.0.1", "10.0.0.2"])
    client = pki.creds("web", dns=["web.default.svc"])
    r = handshake(server, client, server_policy=IP_MODE, client_policy=IP_MODE, dst_ip="10.0.0.2")
    assert r.client.conn is not None and r.server.conn is not None
    memo = IdentityMemo()
    assert memo.verify(r.client.conn, IP_MODE, "10.0.0.2") == r.client.peer
    # The same certificate, dialed at an address it does not name: refused, not remembered ok.
    with pytest.raises(IdentityError, match=r"IP SAN mismatch: want 10.0.0.3"):
        memo.verify(r.client.conn, IP_MODE, "10.0.0.3")
    assert memo.verify(r.server.conn, IP_MODE, None) == PeerIdentity(None, "DNS web.default.svc")


def test_identity_memo_remembers_a_refusal_and_follows_the_policy(pki: PKI) -> None:
    r = handshake(
        pki.creds("db", spiffe_ids=[DB]), pki.creds("web", spiffe_ids=["spiffe://evil.org/web"])
    )
    assert r.server.conn is not None
    memo = IdentityMemo()
    for _ in range(2):
        with pytest.raises(IdentityError, match="^wrong trust domain 'evil.org'"):
            memo.verify(r.server.conn, SPIFFE, None)
    assert len(memo) == 1
    ok = handshake(pki.creds("db", spiffe_ids=[DB]), pki.creds("web", spiffe_ids=[WEB]))
    assert ok.server.conn is not None
    assert memo.verify(ok.server.conn, SPIFFE, None) == PeerIdentity(WEB, WEB)
    # Another policy: the verdicts of the first one are not reused.
    only_db = IdentityPolicy(allow_ids=(DB,))
    with pytest.raises(IdentityError, match="not in allow-list"):
        memo.verify(ok.server.conn, only_db, None)


def test_identity_memo_checks_expiry_on_every_connection(
    pki: PKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = handshake(pki.creds("db", spiffe_ids=[DB]), pki.creds("web", spiffe_ids=[WEB]))
    assert r.client.conn is not None
    memo = IdentityMemo()
    assert memo.verify(r.client.conn, SPIFFE, "127.0.0.1") == PeerIdentity(DB, DB)

    class Later(dt.datetime):
        @classmethod
        def now(cls, tz: dt.tzinfo | None = None) -> Later:
            return cls.fromtimestamp(NOW.timestamp() + 400 * 86400, tz)

    # A remembered verdict whose certificate has expired since (a resumed session).
    monkeypatch.setattr(tlspolicy, "dt", types.SimpleNamespace(datetime=Later, UTC=dt.UTC))
    with pytest.raises(IdentityError, match="^certificate expired on "):
        memo.verify(r.client.conn, SPIFFE, "127.0.0.1")


# --- not TLS, old TLS, broken connections -------------------------------------------------


def test_tls11_only_client_is_refused(pki: PKI) -> None:
    old = SSL.Context(SSL.TLS_METHOD)
    old.set_min_proto_version(SSL.TLS1_VERSION)
    old.set_max_proto_version(SSL.TLS1_1_VERSION)
    old.set_cipher_list(b"DEFAULT:@SECLEVEL=0")  # let OpenSSL still speak TLS 1.1 at all
    r = run_pair(server_context(pki.creds("db", dns=["db"])), old)
    assert r.server.reason == "TLS version not supported"
    assert r.client.reason == "peer alert: tlsv1 alert protocol version"


def test_plaintext_http_on_tls_port(pki: PKI) -> None:
    ctx = server_context(pki.creds("db", dns=["db"]))
    r = run_pair(ctx, None, raw=b"GET / HTTP/1.1\r\nHost: db\r\n\r\n")
    assert r.server.reason == "plaintext HTTP on TLS port"


def test_other_protocol_is_not_tls(pki: PKI) -> None:
    ctx = server_context(pki.creds("db", dns=["db"]))
    r = run_pair(ctx, None, raw=b"SSH-2.0-OpenSSH_9.6\r\n")
    assert r.server.reason == "not TLS"


def test_peer_closed_during_handshake(pki: PKI) -> None:
    r = run_pair(server_context(pki.creds("db", dns=["db"])), None, raw=b"")
    assert r.server.reason == "peer closed during handshake"


def test_connection_reset_during_handshake(pki: PKI) -> None:
    r = run_pair(server_context(pki.creds("db", dns=["db"])), None, reset=True)
    assert r.server.reason == "connection reset during handshake"


# --- explain without sockets ------------------------------------------------------------


def test_explain_unwraps_the_stream_error() -> None:
    cause = SSL.Error([("SSL routines", "", "http request")])
    try:
        raise trio.BrokenResourceError("handshake failed") from cause
    except trio.BrokenResourceError as exc:
        assert explain_failure(exc, None) == "plaintext HTTP on TLS port"


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (SSL.Error([("SSL routines", "", "no shared cipher")]), "no shared cipher"),
        (
            SSL.Error([("SSL routines", "", "sslv3 alert bad certificate")]),
            "peer alert: sslv3 alert bad certificate",
        ),
        (SSL.Error([("SSL routines", "", "packet length too long")]), "not TLS"),
        (SSL.ZeroReturnError(), "peer closed during handshake"),
        (
            ConnectionResetError(104, "Connection reset by peer"),
            "connection reset during handshake",
        ),
        (IdentityError("no SPIFFE ID"), "no SPIFFE ID"),
    ],
)
def test_explain_reasons(exc: BaseException, reason: str) -> None:
    assert explain_failure(exc, None) == reason


# --- load_credentials ---------------------------------------------------------------------


def _one_line_error(files: TLSFiles, **kw: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load_credentials(files, **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_load_credentials_ok(pki: PKI) -> None:
    creds = pki.creds("web", spiffe_ids=[WEB], ips=["10.0.0.2"])
    assert creds.spiffe_id == WEB
    assert creds.not_after == creds.cert.not_valid_after_utc
    assert creds.chain == ()
    assert [c.subject for c in creds.ca_certs] == [pki.cert.subject]
    assert "PrivateKey" not in repr(creds)  # the key object stays out of logs


def test_load_credentials_missing_cert_says_how_to_create_it(tmp_path: Path, pki: PKI) -> None:
    files = TLSFiles(tmp_path / "nope.crt", tmp_path / "nope.key", pki.ca_path)
    message = _one_line_error(files)
    assert message.startswith(f"certificate file {tmp_path / 'nope.crt'}: cannot read: ")
    assert "No such file or directory" in message
    assert "trio-tproxy certs ca --out DIR" in message and "trio-tproxy certs issue" in message


def test_load_credentials_missing_key(tmp_path: Path, pki: PKI) -> None:
    pki.creds("web", dns=["web"])
    files = TLSFiles(tmp_path / "web.crt", tmp_path / "gone.key", pki.ca_path)
    message = _one_line_error(files)
    assert message.startswith(f"key file {tmp_path / 'gone.key'}: cannot read")
    assert "trio-tproxy certs issue" in message


def test_load_credentials_garbage_certificate(tmp_path: Path, pki: PKI) -> None:
    pki.creds("web", dns=["web"])
    (tmp_path / "web.crt").write_text("this is not a certificate\n")
    message = _one_line_error(TLSFiles(tmp_path / "web.crt", tmp_path / "web.key", pki.ca_path))
    assert message.startswith(f"certificate file {tmp_path / 'web.crt'}: no certificate (not PEM")


def test_load_credentials_malformed_certificate(tmp_path: Path, pki: PKI) -> None:
    pki.creds("web", dns=["web"])
    bad = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    (tmp_path / "web.crt").write_text(bad)
    message = _one_line_error(TLSFiles(tmp_path / "web.crt", tmp_path / "web.key", pki.ca_path))
    assert message.startswith(f"certificate file {tmp_path / 'web.crt'}: malformed certificate")


def test_load_credentials_malformed_key(tmp_path: Path, pki: PKI) -> None:
    pki.creds("web", dns=["web"])
    (tmp_path / "web.key").write_text(
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
    )
    message = _one_line_error(TLSFiles(tmp_path / "web.crt", tmp_path / "web.key", pki.ca_path))
    assert message.startswith(f"key file {tmp_path / 'web.key'}: malformed private key")


def test_load_credentials_mismatched_key(tmp_path: Path, pki: PKI) -> None:
    pki.creds("web", dns=["web"])
    pki.creds("db", dns=["db"])
    files = TLSFiles(tmp_path / "web.crt", tmp_path / "db.key", pki.ca_path)
    assert _one_line_error(files) == (
        f"key file {tmp_path / 'db.key'} does not match certificate {tmp_path / 'web.crt'}"
    )


def test_load_credentials_expired(tmp_path: Path, pki: PKI) -> None:
    end = dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    cert, key = certs.issue(pki.cert, pki.key, dns=["old"], not_after=end)
    certs.write_cert(tmp_path / "old.crt", cert)
    certs.write_key(tmp_path / "old.key", key)
    files = TLSFiles(tmp_path / "old.crt", tmp_path / "old.key", pki.ca_path)
    assert _one_line_error(files) == (
        f"certificate file {tmp_path / 'old.crt'}: certificate expired on 2024-01-02 03:04:05 UTC"
    )


def test_load_credentials_not_yet_valid(tmp_path: Path, pki: PKI) -> None:
    pki.creds("web", dns=["web"])
    files = TLSFiles(tmp_path / "web.crt", tmp_path / "web.key", pki.ca_path)
    message = _one_line_error(files, now=NOW - dt.timedelta(days=1))
    assert message.startswith(f"certificate file {tmp_path / 'web.crt'}: certificate not yet valid")


def test_load_credentials_ca_file_without_certificate(tmp_path: Path, pki: PKI) -> None:
    pki.creds("web", dns=["web"])
    # A classic slip: the CA *key* passed as the CA bundle.
    certs.write_key(tmp_path / "ca.key", pki.key)
    files = TLSFiles(tmp_path / "web.crt", tmp_path / "web.key", tmp_path / "ca.key")
    message = _one_line_error(files)
    assert message.startswith(f"CA file {tmp_path / 'ca.key'}: no certificate")


def test_load_credentials_missing_ca_file(tmp_path: Path, pki: PKI) -> None:
    pki.creds("web", dns=["web"])
    files = TLSFiles(tmp_path / "web.crt", tmp_path / "web.key", tmp_path / "missing-ca.crt")
    message = _one_line_error(files)
    assert message.startswith(f"CA file {tmp_path / 'missing-ca.crt'}: cannot read")


def test_load_credentials_keeps_intermediates(tmp_path: Path, pki: PKI) -> None:
    cert, key = certs.issue(pki.cert, pki.key, spiffe_ids=[WEB])
    certs.write_cert(tmp_path / "chain.crt", cert, pki.cert)
    certs.write_key(tmp_path / "chain.key", key)
    creds = load_credentials(TLSFiles(tmp_path / "chain.crt", tmp_path / "chain.key", pki.ca_path))
    assert creds.cert == cert
    assert creds.chain == (pki.cert,)
    assert isinstance(creds.chain[0], x509.Certificate)


def test_load_credentials_rejects_server_only_certificate(tmp_path: Path, pki: PKI) -> None:
    # A sidecar is a TLS client on egress: a serverAuth-only leaf would fail there.
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "server-only")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(pki.cert.subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - dt.timedelta(hours=1))
        .not_valid_after(NOW + dt.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(pki.key, hashes.SHA256())
    )
    certs.write_cert(tmp_path / "srv.crt", cert)
    certs.write_key(tmp_path / "srv.key", key)
    files = TLSFiles(tmp_path / "srv.crt", tmp_path / "srv.key", pki.ca_path)
    assert _one_line_error(files).startswith(
        f"certificate file {tmp_path / 'srv.crt'}: extended key usage lacks clientAuth"
    )


def test_load_credentials_accepts_naive_now(pki: PKI) -> None:
    naive = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    assert pki.creds("web", dns=["web"], now=naive).spiffe_id is None
