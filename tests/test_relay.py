"""The relay and the TLS stream over real loopback sockets and real TLS.

The chain is app -> relay(plain->TLS) -> relay(TLS->plain) -> app, exactly the
two sidecars' data path without the kernel redirection (the netns suite adds it).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import select
import socket
import struct
import termios

import pytest
import trio
import trio.testing

from lab.chain import (
    Contexts,
    CountingLib,
    abort_socket_stream,
    chain,
    contexts,
    expect_reset,
    is_closed,
    open_fds,
    read_to_eof,
    tcp_pair,
    tls_pair,
)
from lab.pki import make_pki
from trio_tproxy.plainstream import PlainStream
from trio_tproxy.relay import relay
from trio_tproxy.streams import ConnectionReset, State, TruncatedError

# Every test here runs on the compiled data path and on the pure-Python one.
pytestmark = pytest.mark.usefixtures("data_path")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Contexts, Contexts]:
    files = make_pki(tmp_path_factory.mktemp("pki"))
    return contexts(files["a"]), contexts(files["b"])


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def queued_at_least(sock: trio.socket.SocketType, n: int, within: float = 5.0) -> None:
    """Wait until the kernel holds at least ``n`` unread bytes for ``sock`` (FIONREAD)."""
    with trio.fail_after(within):
        while True:
            await trio.lowlevel.wait_readable(sock)
            queued = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]
            if queued >= n:
                return
            await trio.sleep(0.001)  # more is on its way: the socket stays readable


@pytest.mark.parametrize("size", [0, 1, 16383, 16384, 16385, 1 << 20, 8 << 20])
def test_data_integrity_both_ways_with_half_close(pki, size):
    a, b = pki
    request, answer = os.urandom(size), os.urandom(size // 2 + 3)

    async def main():
        async with chain(a, b) as ch:

            async def client():
                await ch.client.send_all(request)
                await ch.client.send_eof()
                assert digest(await read_to_eof(ch.client)) == digest(answer)

            async def server():
                assert digest(await read_to_eof(ch.server)) == digest(request)
                await ch.server.send_all(answer)
                await ch.server.send_eof()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(client)
                nursery.start_soon(server)
        assert [r.outcome for r in ch.results] == ["ok", "ok"]
        assert all(is_closed(leg) for leg in ch.legs)
        # both relays see the app client's bytes as a->b and the answer as b->a
        assert [(r.a_to_b, r.b_to_a) for r in ch.results] == [(size, len(answer))] * 2

    trio.run(main)


@pytest.mark.parametrize("who_closes_first", ["client", "server"])
def test_half_close_then_late_answer(pki, who_closes_first):
    """One end sends and shuts its write side; the other answers 2 s later."""
    a, b = pki

    async def main():
        async with chain(a, b) as ch:
            first, second = (
                (ch.client, ch.server) if who_closes_first == "client" else (ch.server, ch.client)
            )
            await first.send_all(b"question")
            await first.send_eof()
            assert await read_to_eof(second) == b"question"
            await trio.sleep(2)
            answer = os.urandom(3 << 20)

            async def answer_then_eof():
                await second.send_all(answer)
                await second.send_eof()

            async with trio.open_nursery() as nursery:  # 3 MiB exceeds the socket buffers
                nursery.start_soon(answer_then_eof)
                assert await read_to_eof(first) == answer
        assert [r.outcome for r in ch.results] == ["ok", "ok"]

    trio.run(main)


@pytest.mark.parametrize("who_resets", ["client", "server"])
def test_reset_reaches_other_end_as_reset(pki, who_resets):
    a, b = pki

    async def main():
        async with chain(a, b) as ch:
            resetter, victim = (
                (ch.client, ch.server) if who_resets == "client" else (ch.server, ch.client)
            )
            await resetter.send_all(b"hello")
            assert await victim.receive_some(100) == b"hello"
            await abort_socket_stream(resetter)
            await expect_reset(victim)
        # Both relays saw it: the one next to the resetter on its plain (or TLS)
        # leg, the other as the first relay's abort on the TLS leg.
        assert [r.outcome for r in ch.results] == ["reset", "reset"]
        assert all(is_closed(leg) for leg in ch.legs)

    trio.run(main)


def test_reset_after_half_close_still_resets(pki):
    """A half-closed connection that is then aborted must not look complete."""
    a, b = pki

    async def main():
        async with chain(a, b) as ch:
            await ch.client.send_all(b"x" * 1000)
            await ch.client.send_eof()
            assert len(await read_to_eof(ch.server)) == 1000
            await abort_socket_stream(ch.server)
            await expect_reset(ch.client)

    trio.run(main)


def test_fin_without_close_notify_reaches_app_as_reset(pki):
    """Truncation on the TLS leg: a bare TCP FIN is never a clean EOF."""
    a, b = pki

    async def main():
        tls_client, tls_server = await tls_pair(a.client, b.server)
        r2_socket, app = await tcp_pair()
        r2_plain = PlainStream(r2_socket.socket)
        async with trio.open_nursery() as nursery:
            results = []

            async def run():
                results.append(await relay(tls_server, r2_plain))

            nursery.start_soon(run)
            await tls_client.send_all(b"partial answer")
            assert await app.receive_some(100) == b"partial answer"
            tls_client.socket.shutdown(socket.SHUT_WR)  # FIN, no close_notify
            await expect_reset(app)
        assert results[0].outcome == "truncated"
        await tls_client.aclose()
        await app.aclose()

    trio.run(main)


def test_tls_stream_eof_semantics(pki):
    a, b = pki

    async def main():
        client, server = await tls_pair(a.client, b.server)
        await client.send_all(b"data")
        await client.send_eof()
        await client.send_eof()  # idempotent
        with pytest.raises(trio.ClosedResourceError):
            await client.send_all(b"more")
        assert await read_to_eof(server) == b"data"
        assert await server.receive_some() == b""  # EOF is sticky
        # the other direction still works after our send_eof
        await server.send_all(b"reply")
        await server.send_eof()
        assert await read_to_eof(client) == b"reply"
        await client.aclose()
        await client.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await client.receive_some()
        await server.aclose()

    trio.run(main)


def test_tls_stream_reset_and_truncation_are_distinct(pki):
    a, b = pki

    async def main():
        client, server = await tls_pair(a.client, b.server)
        await client.abort()
        with pytest.raises(ConnectionReset):
            await server.receive_some()
        with pytest.raises(trio.BrokenResourceError):
            await server.receive_some()  # broken state is sticky
        await server.aclose()

        client, server = await tls_pair(a.client, b.server)
        await client.send_all(b"x" * 40000)
        client.socket.shutdown(socket.SHUT_WR)
        received = b""
        with pytest.raises(TruncatedError):
            while True:
                received += await server.receive_some()
        assert received == b"x" * 40000  # data before the cut is still delivered
        await client.aclose()
        await server.aclose()

    trio.run(main)


def test_receive_drains_several_records(pki):
    a, b = pki

    async def main():
        client, server = await tls_pair(a.client, b.server)
        await client.send_all(b"y" * (128 * 1024))
        await queued_at_least(server.socket, 64 * 1024)  # several records have arrived
        data = await server.receive_some()
        assert len(data) > 16384, "one receive_some should drain many 16 KiB records"
        await client.aclose()
        await server.aclose()

    trio.run(main)


def test_half_close_timeout_aborts_both(pki):
    a, b = pki

    async def main():
        async with chain(a, b, half_close_timeout=0.5) as ch:
            await ch.client.send_eof()
            assert await read_to_eof(ch.server) == b""
            # the server never finishes: after 0.5 s both relays give up
            await expect_reset(ch.client)
        assert "timeout" in {r.outcome for r in ch.results}
        assert all(is_closed(leg) for leg in ch.legs)

    trio.run(main)


def test_half_close_timeout_is_inactivity_not_a_deadline(pki):
    """Issue 8, finding 7 (scaled down): after the client's FIN the server streams for
    five times the half-close timeout, a chunk every 0.05 s: all of it arrives, then EOF."""
    a, b = pki
    chunk = os.urandom(10_000)

    async def main():
        async with chain(a, b, half_close_timeout=0.4) as ch:
            await ch.client.send_eof()
            assert await read_to_eof(ch.server) == b""
            received = []

            async def client_reads() -> None:
                received.append(await read_to_eof(ch.client))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(client_reads)
                start = trio.current_time()
                sent = 0
                while trio.current_time() - start < 2.0:
                    await ch.server.send_all(chunk)
                    sent += len(chunk)
                    await trio.sleep(0.05)
                await ch.server.send_eof()
            assert received == [chunk * (sent // len(chunk))]
        assert {r.outcome for r in ch.results} == {"ok"}, ch.results

    trio.run(main)


def test_idle_timeout_resets_both_after_inactivity_either_way(pki):
    """Bytes one way keep the connection alive (inactivity means both ways); once
    nothing moves for the idle timeout, both apps get a reset."""
    a, b = pki

    async def main():
        async with chain(a, b, idle_timeout=0.4) as ch:
            start = trio.current_time()
            while trio.current_time() - start < 1.5:
                await ch.client.send_all(b"tick")  # one direction only
                await trio.sleep(0.1)
            got = 0
            with trio.fail_after(2):
                while got < 4 * 15:
                    got += len(await ch.server.receive_some(1 << 16))
            quiet = trio.current_time()
            await expect_reset(ch.client, within=2)
            waited = trio.current_time() - quiet
            await expect_reset(ch.server, within=2)
        assert 0.3 <= waited <= 1.2, waited
        assert {r.outcome for r in ch.results} == {"timeout"}, ch.results
        assert all("idle for more than 0.4s" in r.detail for r in ch.results), ch.results
        assert all(is_closed(leg) for leg in ch.legs)

    trio.run(main)


def test_cancelling_the_relay_closes_both_sockets(pki):
    a, b = pki

    async def main():
        x_socket, app = await tcp_pair()
        x = PlainStream(x_socket.socket)
        y_client, y = await tls_pair(a.client, b.server)
        with trio.move_on_after(0.3):
            await relay(x, y)
        assert is_closed(x) and is_closed(y)
        await expect_reset(app)
        with pytest.raises(trio.BrokenResourceError):
            await y_client.receive_some()
        await app.aclose()
        await y_client.aclose()

    trio.run(main)


def test_no_fd_growth_after_1000_connections(pki):
    a, b = pki

    async def one() -> None:
        async with chain(a, b) as ch:
            await ch.client.send_all(b"ping")
            await ch.client.send_eof()
            assert await read_to_eof(ch.server) == b"ping"
            await ch.server.send_all(b"pong")
            await ch.server.send_eof()
            assert await read_to_eof(ch.client) == b"pong"

    async def main():
        await one()  # warm up lazily opened fds (e.g. the trio wakeup fd)
        before = open_fds()
        limiter = trio.CapacityLimiter(20)

        async def limited():
            async with limiter:
                await one()

        async with trio.open_nursery() as nursery:
            for _ in range(1000):
                nursery.start_soon(limited)
        assert open_fds() == before

    trio.run(main)


def test_tls_stream_rejects_concurrent_receivers(pki):
    a, b = pki

    async def main():
        client, server = await tls_pair(a.client, b.server)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.receive_some)
            await trio.testing.wait_all_tasks_blocked()  # it is parked in receive_some
            with trio.fail_after(5), pytest.raises(trio.BusyResourceError):
                await server.receive_some()
            await client.send_all(b"z")
        await client.aclose()
        await server.aclose()

    trio.run(main)


def test_public_api_fallback_carries_data_and_eof(pki, monkeypatch):
    """The paths used if pyOpenSSL's private cffi handles ever disappear."""
    from trio_tproxy import ossl, tlsstream

    monkeypatch.setattr(tlsstream, "drain", ossl.drain_public)
    a, b = pki
    payload = os.urandom(1 << 20)

    async def main():
        client, server = await tls_pair(a.client, b.server)

        async def send():
            await client.send_all(payload)
            await client.send_eof()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            assert digest(await read_to_eof(server)) == digest(payload)
        await server.send_all(b"x")
        server.socket.shutdown(socket.SHUT_WR)  # a cut, no close_notify: still truncation
        assert await client.receive_some() == b"x"
        with pytest.raises(TruncatedError):
            await client.receive_some()
        await client.aclose()
        await server.aclose()

    trio.run(main)


def test_was_reset_tells_a_consumed_reset_from_a_fin():
    """A reset is reported once: after a send collects it, recv says EOF.
    TCP_INFO still tells the two apart (the relay relies on it)."""
    from trio_tproxy import kernel

    def pair():
        listener = socket.create_server(("127.0.0.1", 0))
        ours = socket.create_connection(listener.getsockname())
        theirs, _ = listener.accept()
        listener.close()
        return ours, theirs

    ours, theirs = pair()
    kernel.set_abort_on_close(theirs)
    theirs.close()  # RST
    assert select.select([ours], [], [], 5)[0], "the reset did not arrive"
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        ours.send(b"x")  # collects the error...
    assert ours.recv(10) == b""  # ...so this looks like a clean EOF
    assert kernel.was_reset(ours)
    ours.close()

    ours, theirs = pair()
    theirs.shutdown(socket.SHUT_WR)  # a real FIN
    assert select.select([ours], [], [], 5)[0], "the FIN did not arrive"
    assert ours.recv(10) == b""
    assert not kernel.was_reset(ours)
    ours.close()
    theirs.close()


# --- PlainStream: states, abort, a reset hidden behind EOF ---------------------------


def test_plain_stream_broken_state_is_sticky_and_never_retries():
    async def main():
        ours, theirs = await tcp_pair()
        stream = PlainStream(ours.socket)
        await abort_socket_stream(theirs)
        with pytest.raises(ConnectionReset):
            await stream.receive_some()
        assert stream.state is State.BROKEN
        for call in (stream.receive_some(), stream.send_all(b"x"), stream.send_eof()):
            with pytest.raises(trio.BrokenResourceError, match="is broken"):
                await call
        await stream.aclose()
        assert stream.state is State.CLOSED and is_closed(stream)
        with pytest.raises(trio.ClosedResourceError):
            await stream.receive_some()

    trio.run(main)


def test_plain_stream_abort_resets_the_peer():
    async def main():
        ours, theirs = await tcp_pair()
        stream = PlainStream(ours.socket)
        await stream.send_all(b"bye")
        await stream.abort()
        await stream.abort()  # idempotent
        assert is_closed(stream)
        await expect_reset(theirs)
        await theirs.aclose()

    trio.run(main)


def test_plain_stream_reports_a_reset_hidden_behind_eof():
    """After a send collected the RST, recv says 0: the stream still says reset."""

    async def main():
        ours, theirs = await tcp_pair()
        stream = PlainStream(ours.socket)
        await abort_socket_stream(theirs)
        await trio.lowlevel.wait_readable(ours.socket)
        with pytest.raises(OSError):
            await ours.socket.send(b"x")  # collects the reset, as a concurrent pump would
        with pytest.raises(ConnectionReset, match="seen as EOF"):
            await stream.receive_some()
        await stream.aclose()

        ours, theirs = await tcp_pair()  # a real FIN stays a clean EOF
        stream = PlainStream(ours.socket)
        await theirs.send_eof()
        assert await stream.receive_some() == b""
        assert stream.state is State.OK
        await stream.aclose()
        await theirs.aclose()

    trio.run(main)


def test_plain_stream_rejects_concurrent_receivers():
    async def main():
        ours, theirs = await tcp_pair()
        stream = PlainStream(ours.socket)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.receive_some)
            await trio.testing.wait_all_tasks_blocked()
            with trio.fail_after(5), pytest.raises(trio.BusyResourceError):
                await stream.receive_some()
            await theirs.send_all(b"z")
        await stream.aclose()
        await theirs.aclose()

    trio.run(main)


def test_the_compiled_path_carries_the_data_not_the_python_loop(pki, data_path, monkeypatch):
    """32 MiB echoed, then the ends.  Compiled: the relay's receive_some runs only to
    meet the EOF.  Relay thread: Python's per-wake-up calls run only to meet the ends
    too (the thread hands a connection back at its first end, see fastpath)."""
    from trio_tproxy import fastpath
    from trio_tproxy.tlsstream import TLSStream

    calls = {"plain": 0, "tls": 0}
    for kind, cls in (("plain", PlainStream), ("tls", TLSStream)):
        original = cls.receive_some

        async def counted(self, max_bytes=None, _original=original, _kind=kind):
            calls[_kind] += 1
            return await _original(self, max_bytes)

        monkeypatch.setattr(cls, "receive_some", counted)
    lib = CountingLib(fastpath._lib)
    monkeypatch.setattr(fastpath, "_lib", lib)
    a, b = pki
    payload = os.urandom(32 << 20)

    async def main():
        async with chain(a, b) as ch:

            async def send():
                await ch.client.send_all(payload)

            async def receive():
                echoed = bytearray()
                while len(echoed) < len(payload):
                    echoed += await ch.client.receive_some(1 << 20)
                assert digest(bytes(echoed)) == digest(payload)
                await ch.client.send_eof()
                assert await read_to_eof(ch.client) == b""

            async def server():
                while data := await ch.server.receive_some(1 << 20):
                    await ch.server.send_all(data)
                await ch.server.send_eof()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                nursery.start_soon(receive)
                nursery.start_soon(server)

    trio.run(main)
    # The chain's client and server are trio SocketStreams: only the relays count.
    # Two relays, two directions each: one EOF read per direction.
    if data_path == "python":
        assert calls["plain"] > 8 and calls["tls"] > 8
        return
    assert calls == {"plain": 2, "tls": 2}
    if data_path == "thread":
        # Per wake-up until promoted (PROMOTE_AFTER waits per direction), then one
        # call per direction meets its end (sticky), and the EOF's way back waits
        # once or twice: a few dozen calls, where per wake-up takes hundreds.
        assert lib.steps <= 4 * (fastpath.PROMOTE_AFTER + 1) + 16, lib.steps
    else:
        assert lib.steps > 4 * (fastpath.PROMOTE_AFTER + 1) + 16, lib.steps
