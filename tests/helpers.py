"""Shared test plumbing: a throwaway PKI, loopback socket pairs, TLS pairs and a
two-relay chain (app -> relay plain->TLS -> relay TLS->plain -> app) built from
real sockets and real TLS, as the sidecars do it, minus the kernel redirection."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from trio_tproxy import certs, tlspolicy
from trio_tproxy.config import IdentityPolicy, TLSFiles
from trio_tproxy.credentials import load_credentials
from trio_tproxy.plainstream import PlainStream
from trio_tproxy.relay import RelayResult, relay
from trio_tproxy.tlsstream import TLSStream

TRUST_DOMAIN = "cluster.local"


def spiffe(sa: str, ns: str = "default", domain: str = TRUST_DOMAIN) -> str:
    return f"spiffe://{domain}/ns/{ns}/sa/{sa}"


def make_pki(directory: Path, names: tuple[str, ...] = ("a", "b")) -> dict[str, TLSFiles]:
    """A CA and one leaf per name (SPIFFE ID .../sa/<name>, IP SAN 127.0.0.1 and ::1)."""
    ca_cert, ca_key = certs.make_ca()
    certs.write_cert(directory / "ca.crt", ca_cert)
    files = {}
    for name in names:
        cert, key = certs.issue(
            ca_cert, ca_key, spiffe_ids=[spiffe(name)], ips=["127.0.0.1", "::1"]
        )
        certs.write_cert(directory / f"{name}.crt", cert)
        certs.write_key(directory / f"{name}.key", key)
        files[name] = TLSFiles(
            directory / f"{name}.crt", directory / f"{name}.key", directory / "ca.crt"
        )
    return files


@dataclass
class Contexts:
    client: object
    server: object


def contexts(files: TLSFiles, policy: IdentityPolicy | None = None) -> Contexts:
    creds = load_credentials(files)
    return Contexts(tlspolicy.client_context(creds), tlspolicy.server_context(creds))


async def tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """A connected pair of real TCP sockets on loopback: (client, server)."""
    listener = trio.socket.socket()
    try:
        await listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = trio.socket.socket()
        await client.connect(listener.getsockname())
        server, _ = await listener.accept()
    finally:
        listener.close()
    return trio.SocketStream(client), trio.SocketStream(server)


async def tls_pair(client_ctx: object, server_ctx: object) -> tuple[TLSStream, TLSStream]:
    """Two TLSStreams over a real TCP connection, handshakes completed."""
    c, s = await tcp_pair()
    client = TLSStream(c.socket, tlspolicy.new_connection(client_ctx, c.socket, server=False))
    server = TLSStream(s.socket, tlspolicy.new_connection(server_ctx, s.socket, server=True))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)
        nursery.start_soon(server.do_handshake)
    return client, server


@dataclass
class Chain:
    """app_client <-> [relay1: plain|TLS] <-> [relay2: TLS|plain] <-> app_server."""

    client: trio.SocketStream
    server: trio.SocketStream
    legs: list[trio.abc.Stream]
    results: list[RelayResult]


@asynccontextmanager
async def chain(
    a: Contexts, b: Contexts, *, half_close_timeout: float = 60.0, tls_hook=None
) -> AsyncIterator[Chain]:
    """Run both relays in a nursery; the body drives the two app ends.

    ``tls_hook(client_tls, server_tls)`` may replace the TLS pair (to inject faults).
    """
    app_c, r1_plain = await tcp_pair()
    r2_plain, app_s = await tcp_pair()
    r1_tls, r2_tls = await tls_pair(a.client, b.server)
    results: list[RelayResult] = []

    async def run(x: trio.abc.HalfCloseableStream, y: trio.abc.HalfCloseableStream) -> None:
        results.append(await relay(x, y, half_close_timeout=half_close_timeout))

    r1_plain, r2_plain = PlainStream(r1_plain.socket), PlainStream(r2_plain.socket)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, r1_plain, r1_tls)
        nursery.start_soon(run, r2_tls, r2_plain)
        try:
            yield Chain(app_c, app_s, [r1_plain, r1_tls, r2_tls, r2_plain], results)
        finally:
            with trio.move_on_after(5):
                # The relays end on their own once both app ends are done.
                while len(results) < 2:  # noqa: ASYNC110 - polls a list
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
            await app_c.aclose()
            await app_s.aclose()


async def read_to_eof(stream: trio.abc.ReceiveStream) -> bytes:
    parts = []
    while data := await stream.receive_some(1 << 20):
        parts.append(data)
    return b"".join(parts)


async def expect_reset(stream: trio.abc.ReceiveStream, within: float = 5.0) -> None:
    """The stream must end with ECONNRESET, not EOF (data before it is ignored)."""
    with trio.fail_after(within):
        while True:
            try:
                data = await stream.receive_some(1 << 20)
            except trio.BrokenResourceError as exc:
                assert isinstance(exc.__cause__, ConnectionResetError) or "reset" in str(exc), exc
                return
            assert data, "got a clean EOF where a reset was required"


async def abort_socket_stream(stream: trio.SocketStream) -> None:
    stream.socket.setsockopt(
        socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
    )
    await stream.aclose()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def is_closed(stream: trio.abc.Stream) -> bool:
    sock = getattr(stream, "socket", None)
    assert sock is not None
    return bool(sock.fileno() == -1)
