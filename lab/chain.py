"""The sidecars' data path without the kernel: loopback socket pairs, TLS pairs and a
two-relay chain (app -> relay plain->TLS -> relay TLS->plain -> app) built from
real sockets and real TLS, as the sidecars do it, minus the kernel redirection.

The unit tests drive it directly; :func:`loopback_transport` wraps it as a
*transport* for the relay property (fuzz/relay_property.py), used by
tests/test_fuzz.py and ``python -m fuzz.campaign``. Certificates come from
:mod:`lab.pki`.
"""

from __future__ import annotations

import math
import os
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio
from OpenSSL import SSL

from trio_tproxy import kernel, tlspolicy
from trio_tproxy.config import IdentityPolicy, TLSFiles
from trio_tproxy.credentials import load_credentials
from trio_tproxy.plainstream import PlainStream
from trio_tproxy.relay import RelayResult, relay
from trio_tproxy.streams import Stream
from trio_tproxy.tlsstream import TLSStream

__all__ = [
    "Chain",
    "Contexts",
    "Transport",
    "abort_socket_stream",
    "chain",
    "contexts",
    "expect_reset",
    "is_closed",
    "loopback_transport",
    "open_fds",
    "read_to_eof",
    "tcp_pair",
    "tls_pair",
]


@dataclass
class Contexts:
    """One identity's TLS contexts, as a sidecar holds them."""

    client: SSL.Context
    server: SSL.Context


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


async def tls_pair(client_ctx: SSL.Context, server_ctx: SSL.Context) -> tuple[TLSStream, TLSStream]:
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
    legs: list[trio.abc.HalfCloseableStream]
    results: list[RelayResult]


@asynccontextmanager
async def chain(
    a: Contexts, b: Contexts, *, half_close_timeout: float = 60.0, idle_timeout: float = math.inf
) -> AsyncIterator[Chain]:
    """Run both relays in a nursery; the body drives the two app ends."""
    app_c, r1_sock = await tcp_pair()
    r2_sock, app_s = await tcp_pair()
    r1_tls, r2_tls = await tls_pair(a.client, b.server)
    results: list[RelayResult] = []

    async def run(x: Stream, y: Stream) -> None:
        results.append(
            await relay(x, y, half_close_timeout=half_close_timeout, idle_timeout=idle_timeout)
        )

    # The relay carries the sidecar's own streams, as in the proxy.
    r1_plain, r2_plain = PlainStream(r1_sock.socket), PlainStream(r2_sock.socket)

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


#: What fuzz/relay_property.py runs a script against: two connected app ends.
Transport = Callable[[], AbstractAsyncContextManager[tuple[trio.SocketStream, trio.SocketStream]]]


def loopback_transport(a: Contexts, b: Contexts) -> Transport:
    """Each connection through a fresh chain; on exit both relays must have closed every leg."""

    @asynccontextmanager
    async def transport() -> AsyncIterator[tuple[trio.SocketStream, trio.SocketStream]]:
        async with chain(a, b, half_close_timeout=30) as ch:
            yield ch.client, ch.server
        # The property's last clause: both relays closed both legs.
        assert len(ch.results) == 2, "a relay did not finish within the bound"
        assert all(is_closed(leg) for leg in ch.legs), "a relay leg was left open"

    return transport


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
    """Close so that the peer sees a reset (RST), not EOF."""
    kernel.set_abort_on_close(stream.socket)
    await stream.aclose()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def is_closed(stream: trio.abc.Stream) -> bool:
    sock = getattr(stream, "socket", None)
    assert sock is not None
    return bool(sock.fileno() == -1)


class CountingLib:
    """fastpath's C library with its per-wake-up calls and hand-overs counted."""

    def __init__(self, lib: Any) -> None:
        self._lib = lib
        self.steps = 0
        self.started = 0

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self._lib, name)
        if name not in ("tt_plain_to_tls", "tt_tls_to_plain", "tt_conn_start"):
            return fn

        def counted(*args: Any) -> Any:
            if name == "tt_conn_start":
                self.started += 1
            else:
                self.steps += 1
            return fn(*args)

        return counted
