"""The compiled data path's hand-overs between the trio thread and the relay thread.

The relay tests (test_relay.py) and the fuzz property run on every data path;
this file tests what only the relay thread does: when a connection goes to it.
"""

from __future__ import annotations

import functools
import hashlib
import os

import pytest
import trio

from lab.chain import Contexts, CountingLib, chain, contexts, read_to_eof, tcp_pair, tls_pair
from lab.pki import make_pki
from lab.require import skip_or_fail
from trio_tproxy import fastpath
from trio_tproxy.plainstream import PlainStream
from trio_tproxy.relay import RelayResult, relay


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Contexts, Contexts]:
    files = make_pki(tmp_path_factory.mktemp("pki"))
    return contexts(files["a"]), contexts(files["b"])


@pytest.fixture(autouse=True)
def relay_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test here needs the relay thread (started: its fds exist before counting)."""
    if not fastpath.ENABLED or fastpath.MODE != "thread":
        skip_or_fail(f"the relay thread is off: {fastpath.describe()}")
    monkeypatch.setattr(fastpath, "THREAD", True)
    assert fastpath.relay_thread() is not None


@pytest.mark.parametrize("exchanges", [1, 3, 40])
def test_a_connection_goes_to_the_relay_thread_once_it_has_waited_enough(
    pki, monkeypatch, exchanges
):
    """Short exchanges stay per wake-up (no hand-over between threads); a connection
    that keeps talking goes to the thread, once, and everything arrives."""
    monkeypatch.setattr(fastpath, "PROMOTE_AFTER", 8)
    lib = CountingLib(fastpath._lib)
    monkeypatch.setattr(fastpath, "_lib", lib)
    a, b = pki

    async def main():
        async with chain(a, b) as ch:
            for i in range(exchanges):
                message = b"%d:" % i + os.urandom(100)
                await ch.client.send_all(message)
                received = b""
                while len(received) < len(message):
                    received += await ch.server.receive_some(65536)
                assert received == message
                await ch.server.send_all(message[::-1])
                received = b""
                while len(received) < len(message):
                    received += await ch.client.receive_some(65536)
                assert received == message[::-1]
            await ch.client.send_eof()
            assert await read_to_eof(ch.server) == b""
            await ch.server.send_eof()
            assert await read_to_eof(ch.client) == b""

    trio.run(main)
    # Two relays (the chain's two sidecars); each direction waits once per exchange.
    assert lib.started == (2 if exchanges > fastpath.PROMOTE_AFTER else 0)


def test_bytes_the_thread_carried_are_counted_when_the_relay_is_cancelled(pki, monkeypatch):
    monkeypatch.setattr(fastpath, "PROMOTE_AFTER", 0)
    lib = CountingLib(fastpath._lib)
    monkeypatch.setattr(fastpath, "_lib", lib)
    a, b = pki
    result = RelayResult()

    async def main():
        x_socket, app = await tcp_pair()
        peer, y = await tls_pair(a.client, b.server)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                functools.partial(relay, PlainStream(x_socket.socket), y, result=result)
            )
            for _ in range(20):
                await app.send_all(b"q" * 100)
                received = b""
                while len(received) < 100:
                    received += await peer.receive_some(1000)
                await peer.send_all(b"r" * 50)
                received = b""
                while len(received) < 50:
                    received += await app.receive_some(1000)
            nursery.cancel_scope.cancel()
        await app.aclose()
        await peer.aclose()

    trio.run(main)
    assert lib.started == 1  # the thread carried it
    assert (result.outcome, result.a_to_b, result.b_to_a) == ("cancelled", 2000, 1000)


def test_a_promotion_in_full_flow_both_ways_loses_and_repeats_nothing(pki, monkeypatch):
    """8 MiB each way at once, 25 times, promoted mid-flow: the direction that did not decide
    may already have been woken when its wait is cancelled; it must make its last
    C call before the thread starts, not beside it (that race duplicated 256 KiB
    and could crash)."""
    monkeypatch.setattr(fastpath, "PROMOTE_AFTER", 8)
    a, b = pki
    size, block = 8 << 20, 1 << 20

    async def one_way(send: trio.SocketStream, receive: trio.SocketStream) -> None:
        sent, received = hashlib.sha256(), hashlib.sha256()

        async def sender() -> None:
            for _ in range(size // block):
                data = os.urandom(block)
                sent.update(data)
                await send.send_all(data)
            await send.send_eof()

        async def receiver() -> None:
            total = 0
            while data := await receive.receive_some(block):
                received.update(data)
                total += len(data)
            assert total == size

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            nursery.start_soon(receiver)
        assert sent.digest() == received.digest()

    async def main() -> None:
        async with chain(a, b) as ch, trio.open_nursery() as nursery:
            nursery.start_soon(one_way, ch.client, ch.server)
            nursery.start_soon(one_way, ch.server, ch.client)

    for _ in range(25):
        trio.run(main)
