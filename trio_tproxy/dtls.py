"""DTLS 1.2 between sidecars: pyOpenSSL on memory BIOs, driven from trio.

General theory of operation
---------------------------
A UDP flow between two pods is carried as one DTLS association between the
two sidecars, on a *connected* UDP socket of its own at each end (see
:mod:`.udp`). OpenSSL never touches a socket: each :class:`SSL.Connection`
reads from and writes to memory BIOs, and this module moves datagrams
between them and the socket. Memory BIOs are byte streams, so datagram
boundaries are kept by hand:

* **in**: one datagram is written into the BIO and fully consumed
  (``recv`` until ``WantReadError``) before the next one is written, so
  OpenSSL sees exactly one datagram per read (a DTLS "packet"), with all the
  records it carries.
* **out**: everything OpenSSL wrote is split back into DTLS records (each
  has a 13-byte header with its length, :func:`split_records`) and packed
  into datagrams no larger than the ciphertext MTU (:func:`pack_datagrams`).
  OpenSSL itself fragments handshake messages to that MTU
  (``OP_NO_QUERY_MTU`` + ``set_ciphertext_mtu``: a memory BIO cannot be
  asked for a path MTU).

The handshake's retransmission timer is OpenSSL's: ``DTLSv1_get_timeout``
says how long to wait for the peer's next flight, and when that passes
``DTLSv1_handle_timeout`` writes the last flight again (doubling the timer).
Trio only waits on "a datagram arrived" or "the timer fired".

After the handshake, datagram semantics are kept: one application datagram
is one record is one UDP datagram. Nothing is retransmitted, reordered or
reassembled; a lost record is lost; OpenSSL drops records that fail
authentication and replays (its 64-record window), and we count nothing
twice. A datagram larger than the association's cleartext MTU is refused
(:class:`TooBig`), never split or truncated.

Security decisions are those of :mod:`.tlspolicy` (same CA bundle, client
certificate required, identity checked after the handshake by
``verify_server``/``verify_client``), on ``DTLS_METHOD`` contexts with
DTLS 1.2 as the floor. The server side answers a first ClientHello with a
HelloVerifyRequest (``DTLSv1_listen``) and keeps no state until the client
echoes the cookie, an HMAC of the flow's addresses under a per-process key:
a spoofed source never gets a Connection, a socket or a task.

The original destination port of the app's datagram travels in the
handshake as the ALPN protocol ``udp/<port>`` (authenticated by the
Finished messages): the receiving sidecar learns where to deliver without
a byte of framing per datagram.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import trio
from OpenSSL import SSL

from . import tlspolicy
from .config import IdentityPolicy
from .credentials import Credentials
from .identity import IdentityError
from .tlspolicy import TLS12_CIPHERS, HandshakeNotes, PeerIdentity

#: pyOpenSSL names no DTLS versions; DTLS1_2_VERSION from OpenSSL's headers.
DTLS1_2_VERSION: Final = 0xFEFD
#: type(1) version(2) epoch(2) sequence number(6) length(2).
RECORD_HEADER: Final = 13
_LENGTH: Final = struct.Struct("!H")
#: Largest UDP payload OpenSSL may write in one read of its BIO.
_BIO_CHUNK: Final = 65536
#: ALPN protocol carrying the app's original destination port.
ALPN_PREFIX: Final = b"udp/"

Address = tuple[str, int]


# --- framing (pure) -----------------------------------------------------------------


def split_records(data: bytes) -> list[bytes]:
    """Cut the bytes OpenSSL wrote into whole DTLS records.

    A truncated tail (cannot happen with OpenSSL's own output) is kept as
    one last piece rather than lost, so the peer's DTLS layer decides.
    """
    records: list[bytes] = []
    pos, end = 0, len(data)
    while pos < end:
        if end - pos < RECORD_HEADER:
            records.append(data[pos:])
            break
        (length,) = _LENGTH.unpack_from(data, pos + RECORD_HEADER - 2)
        stop = min(end, pos + RECORD_HEADER + length)
        records.append(data[pos:stop])
        pos = stop
    return records


def pack_datagrams(records: list[bytes], mtu: int) -> list[bytes]:
    """Consecutive records packed into as few datagrams of at most ``mtu`` bytes as fit.

    Order is kept. A record larger than ``mtu`` (never made by OpenSSL once
    the MTU is set) travels alone.
    """
    datagrams: list[bytes] = []
    current = b""
    for record in records:
        if current and len(current) + len(record) > mtu:
            datagrams.append(current)
            current = b""
        current += record
    if current:
        datagrams.append(current)
    return datagrams


def alpn_for_port(port: int) -> bytes:
    return ALPN_PREFIX + str(port).encode()


def port_from_alpn(proto: bytes | None) -> int | None:
    """The port in ``udp/<port>``, or None if ``proto`` is not one."""
    if proto is None or not proto.startswith(ALPN_PREFIX):
        return None
    digits = proto[len(ALPN_PREFIX) :]
    if not digits.isdigit() or len(digits) > 5:
        return None
    port = int(digits)
    return port if 1 <= port <= 65535 else None


# --- cookies (stateless, against spoofed ClientHellos) --------------------------------


class FlowNotes(HandshakeNotes):
    """What the verify and cookie callbacks learn about one association."""

    __slots__ = ("flow",)

    def __init__(self, flow: bytes) -> None:
        super().__init__()
        #: The flow's addresses, as the cookie binds them.
        self.flow = flow


def flow_bytes(peer: Address, local: Address) -> bytes:
    return f"{peer[0]}|{peer[1]}|{local[0]}|{local[1]}".encode()


class Cookies:
    """HMAC-SHA256 of the flow's addresses under a key that lives as long as the process."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key if key is not None else secrets.token_bytes(32)

    def make(self, flow: bytes) -> bytes:
        return hmac.new(self._key, flow, hashlib.sha256).digest()

    def check(self, flow: bytes, cookie: bytes) -> bool:
        return hmac.compare_digest(self.make(flow), cookie)

    def generate(self, conn: SSL.Connection) -> bytes:
        data = conn.get_app_data()
        return self.make(data.flow if isinstance(data, FlowNotes) else b"")

    def verify(self, conn: SSL.Connection, cookie: bytes) -> bool:
        data = conn.get_app_data()
        return isinstance(data, FlowNotes) and self.check(data.flow, cookie)


# --- contexts -------------------------------------------------------------------------


def _alpn_select(conn: SSL.Connection, offered: list[bytes]) -> Any:
    for proto in offered:
        if port_from_alpn(proto) is not None:
            return proto
    return SSL.NO_OVERLAPPING_PROTOCOLS  # the handshake fails: no port, no delivery


def _context(creds: Credentials, *, server: bool, cookies: Cookies | None) -> SSL.Context:
    ctx = SSL.Context(SSL.DTLS_METHOD)
    ctx.set_min_proto_version(DTLS1_2_VERSION)
    ctx.set_cipher_list(TLS12_CIPHERS)
    # OP_NO_QUERY_MTU: the MTU is ours to set (a memory BIO has none).
    options: int = SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION | SSL.OP_NO_QUERY_MTU
    if server:
        # pyOpenSSL types OP_COOKIE_EXCHANGE as optional (absent from old OpenSSLs).
        options |= SSL.OP_CIPHER_SERVER_PREFERENCE | int(SSL.OP_COOKIE_EXCHANGE or 0)
    ctx.set_options(options)
    ctx.use_certificate(creds.cert)
    for extra in creds.chain:
        ctx.add_extra_chain_cert(extra)
    ctx.use_privatekey(creds.key)
    ctx.check_privatekey()
    # Only our CA bundle, as for TLS (tlspolicy): never the system roots.
    ctx.load_verify_locations(str(creds.files.ca_cert))
    mode = SSL.VERIFY_PEER
    if server:
        mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
        for ca in creds.ca_certs:
            ctx.add_client_ca(ca)
        ctx.set_alpn_select_callback(_alpn_select)
        assert cookies is not None
        ctx.set_cookie_generate_callback(cookies.generate)
        ctx.set_cookie_verify_callback(cookies.verify)
    ctx.set_verify(mode, tlspolicy._on_verify)  # the TLS contexts' recorder, shared
    return ctx


@dataclass(frozen=True)
class Contexts:
    server: SSL.Context
    client: SSL.Context
    cookies: Cookies


def contexts(creds: Credentials, cookies: Cookies | None = None) -> Contexts:
    """Both DTLS contexts, with the TLS contexts' credentials and checks."""
    cookies = cookies if cookies is not None else Cookies()
    return Contexts(
        server=_context(creds, server=True, cookies=cookies),
        client=_context(creds, server=False, cookies=None),
        cookies=cookies,
    )


def new_connection(ctx: SSL.Context, *, server: bool, flow: bytes, mtu: int) -> SSL.Connection:
    """A memory-BIO Connection whose records fit in ``mtu``-byte datagrams."""
    conn = SSL.Connection(ctx, None)
    conn.set_app_data(FlowNotes(flow))
    conn.set_ciphertext_mtu(mtu)
    if server:
        conn.set_accept_state()
    else:
        conn.set_connect_state()
    return conn


def listen(
    ctx: SSL.Context, datagram: bytes, flow: bytes, mtu: int
) -> tuple[SSL.Connection | None, list[bytes]]:
    """The stateless first step of the server: ``(conn, [])`` if ``datagram`` is a
    ClientHello with a valid cookie (continue the handshake on ``conn``), else
    ``(None, replies)``: a HelloVerifyRequest to send back, or nothing at all
    for a datagram that is not a ClientHello."""
    conn = new_connection(ctx, server=True, flow=flow, mtu=mtu)
    conn.bio_write(datagram)
    try:
        conn.DTLSv1_listen()
    except SSL.WantReadError:
        return None, drain(conn, mtu)
    except SSL.Error:
        return None, []
    return conn, []


def drain(conn: SSL.Connection, mtu: int) -> list[bytes]:
    """What OpenSSL wrote, as datagrams of at most ``mtu`` bytes."""
    written = _read_bio(conn)
    return pack_datagrams(split_records(written), mtu) if written else []


def _read_bio(conn: SSL.Connection) -> bytes:
    """Everything OpenSSL wrote so far (b"" if nothing)."""
    chunks: list[bytes] = []
    while True:
        try:
            chunk = conn.bio_read(_BIO_CHUNK)
        except SSL.WantReadError:
            break
        chunks.append(chunk)
        if len(chunk) < _BIO_CHUNK:
            break
    return b"".join(chunks)


# --- the association ------------------------------------------------------------------


class HandshakeError(Exception):
    """The handshake or the identity check refused the peer; ``str()`` says why."""


class TooBig(Exception):
    """A datagram larger than the association's cleartext MTU (dropped, counted)."""


class PeerClosed(Exception):
    """The peer sent close_notify: the association is over."""


#: Receives one datagram (the flow's connected socket).
Recv = Callable[[], Awaitable[bytes]]
#: Sends one datagram.
Send = Callable[[bytes], Awaitable[object]]


class Association:
    """One DTLS association on one connected UDP socket (its ``recv``/``send``).

    States: handshaking (``handshake()``), then open (``seal``/``open``),
    then closed (``close_notify()`` sent, or :class:`PeerClosed` read). Not
    safe for concurrent ``handshake`` calls; ``seal`` and ``open`` may run
    from two tasks once open (OpenSSL's read and write sides are separate
    and neither blocks).
    """

    def __init__(self, conn: SSL.Connection, mtu: int) -> None:
        self.conn = conn
        self.mtu = mtu
        #: Largest app datagram one record carries (set after the handshake).
        self.cleartext_mtu = 0
        self.peer: PeerIdentity | None = None
        self.info = "-"

    async def handshake(
        self,
        recv: Recv,
        send: Send,
        *,
        timeout: float,  # noqa: ASYNC109 - also the retransmission fallback
        verify: Callable[[SSL.Connection], PeerIdentity],
    ) -> PeerIdentity:
        """Run the handshake to its end within ``timeout``; raise HandshakeError if refused.

        Retransmission is OpenSSL's timer; a datagram that arrives is fed to
        OpenSSL whole, then whatever it wrote is sent.
        """
        conn = self.conn
        try:
            with trio.fail_after(timeout):
                while True:
                    try:
                        conn.do_handshake()
                        break
                    except SSL.WantReadError:
                        pass
                    await self._flush(send)
                    wait = conn.DTLSv1_get_timeout()
                    datagram: bytes | None = None
                    with trio.move_on_after(wait if wait is not None else timeout):
                        datagram = await recv()
                    if datagram is None:
                        conn.DTLSv1_handle_timeout()  # writes the last flight again
                    else:
                        conn.bio_write(datagram)
                await self._flush(send)  # the server's last flight
                peer = verify(conn)
        except trio.TooSlowError:
            raise HandshakeError(f"DTLS handshake timed out after {timeout:g}s") from None
        except IdentityError as exc:
            raise HandshakeError(
                f"identity rejected: {exc} (presented {tlspolicy.presented(conn)})"
            ) from None
        except SSL.Error as exc:
            await self._flush_quietly(send)  # our alert, if OpenSSL wrote one
            raise HandshakeError(
                f"DTLS handshake failed: {tlspolicy.explain_failure(exc, conn)} "
                f"(presented {tlspolicy.presented(conn)})"
            ) from None
        except OSError as exc:
            # An ICMP error on the connected socket (e.g. port unreachable:
            # no sidecar on the peer), reported by recv or send.
            raise HandshakeError(
                f"DTLS handshake failed: {tlspolicy.explain_failure(exc, None)}"
            ) from None
        self.peer = peer
        self.cleartext_mtu = conn.get_cleartext_mtu()
        self.info = f"{conn.get_protocol_version_name()} {conn.get_cipher_name()}"
        return peer

    def seal(self, data: bytes) -> bytes:
        """One app datagram as one record (one UDP datagram); TooBig if it does not fit."""
        if len(data) > self.cleartext_mtu:
            raise TooBig(f"{len(data)} bytes > {self.cleartext_mtu}")
        self.conn.send(data)
        return self.conn.bio_read(_BIO_CHUNK)  # one record: all OpenSSL wrote

    def open(self, datagram: bytes) -> list[bytes]:
        """The app datagrams a received datagram carries (none: dropped by DTLS)."""
        conn = self.conn
        conn.bio_write(datagram)
        out: list[bytes] = []
        while True:
            try:
                out.append(conn.recv(_BIO_CHUNK))
            except SSL.WantReadError:
                return out
            except SSL.ZeroReturnError:
                raise PeerClosed() from None

    def pending(self) -> list[bytes]:
        """Datagrams OpenSSL wants sent outside app data (e.g. a late retransmitted Finished)."""
        return drain(self.conn, self.mtu)

    def close_notify(self) -> bytes:
        """Our close_notify record (best effort: b"" if OpenSSL refuses)."""
        try:
            self.conn.shutdown()
        except SSL.Error:
            pass
        return _read_bio(self.conn)

    async def _flush(self, send: Send) -> None:
        for datagram in drain(self.conn, self.mtu):
            await send(datagram)

    async def _flush_quietly(self, send: Send) -> None:
        try:
            await self._flush(send)
        except (OSError, SSL.Error):
            pass


def verifier_for_server(
    policy: IdentityPolicy, dst_ip: str
) -> Callable[[SSL.Connection], PeerIdentity]:
    return lambda conn: tlspolicy.verify_server(conn, policy, dst_ip)


def verifier_for_client(
    policy: IdentityPolicy,
) -> Callable[[SSL.Connection], PeerIdentity]:
    return lambda conn: tlspolicy.verify_client(conn, policy)
