"""peek.first_bytes_kind over real loopback TCP (no root): the bytes are never consumed,
a ClientHello split across segments is waited for, silence and EOF mean plaintext."""

from __future__ import annotations

import socket

import trio
from OpenSSL import SSL

from trio_tproxy.clienthello import OTHER_TLS, PLAINTEXT, SIDECAR, Kind
from trio_tproxy.peek import first_bytes_kind
from trio_tproxy.tlspolicy import ALPN


def hello(alpn: list[bytes]) -> bytes:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_alpn_protos(alpn)
    conn = SSL.Connection(ctx, None)
    conn.set_connect_state()
    try:
        conn.do_handshake()
    except SSL.WantReadError:
        pass
    return conn.bio_read(65536)


def peek_with(
    chunks: list[bytes], *, pause: float, eof: bool, wait: float = 5.0
) -> tuple[Kind, bytes]:
    """Send ``chunks`` ``pause`` s apart (then EOF if asked); the verdict and what recv gets."""

    async def main() -> tuple[Kind, bytes]:
        listener = trio.socket.socket()
        await listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = trio.socket.socket()
        await client.connect(listener.getsockname())
        server, _ = await listener.accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        async def send() -> None:
            for chunk in chunks:
                await client.send(chunk)
                await trio.sleep(pause)
            if eof:
                client.shutdown(socket.SHUT_WR)

        with client, server, listener:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                kind = await first_bytes_kind(server, ALPN, wait)
            got = b""
            while len(got) < sum(map(len, chunks)):
                got += await server.recv(65536)
            return kind, got

    return trio.run(main)


def test_a_hello_split_across_segments_is_waited_for_and_left_unread():
    data = hello([ALPN])
    kind, got = peek_with([data[:7], data[7:100], data[100:]], pause=0.1, eof=False)
    assert kind is SIDECAR
    assert got == data


def test_foreign_tls_and_plaintext():
    assert peek_with([hello([b"h2"])], pause=0, eof=False)[0] is OTHER_TLS
    assert peek_with([b"GET / HTTP/1.1\r\n\r\n"], pause=0, eof=False)[0] is PLAINTEXT


def test_eof_or_silence_before_a_verdict_is_plaintext():
    data = hello([ALPN])
    kind, got = peek_with([data[:50]], pause=0, eof=True)
    assert kind is PLAINTEXT and got == data[:50]
    kind, _ = peek_with([data[:50]], pause=0.5, eof=False, wait=0.2)
    assert kind is PLAINTEXT
