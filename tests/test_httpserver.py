"""The control-plane HTTP server over real loopback sockets.

Each bound in :class:`~trio_tproxy.httpserver.Limits` is driven by a client
that breaks it (malformed HTTP, huge headers, large bodies, a slowloris, an
idle keep-alive, a failing or hanging handler, too many connections), and
after each one the same server still answers a good request: a bad client
gets a 4xx/5xx or a close, never a crash.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import h11
import pytest
import trio
import trio.testing

from lab.pki import make_pki
from trio_tproxy.httpserver import (
    HttpServer,
    Limits,
    Request,
    Response,
    method_not_allowed,
    text,
)

Address = tuple[str, int]


async def hello(req: Request) -> Response:
    if req.method not in ("GET", "HEAD"):
        return method_not_allowed()
    return text(200, f"hello {req.query}\n")


async def echo(req: Request) -> Response:
    return Response(200, [("content-type", "application/octet-stream")], req.body)


def routes(
    **extra: Callable[[Request], Awaitable[Response]],
) -> dict[str, Callable[[Request], Awaitable[Response]]]:
    return {"/hello": hello, "/echo": echo, **extra}


@asynccontextmanager
async def running(
    server: HttpServer, addresses: list[Address] | None = None
) -> AsyncIterator[list[Address]]:
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(server.serve, addresses or [("127.0.0.1", 0)])
        yield bound
        nursery.cancel_scope.cancel()


async def connect(addr: Address) -> trio.SocketStream:
    return await trio.open_tcp_stream(addr[0], addr[1])


async def read_response(
    stream: trio.abc.ReceiveStream, client: h11.Connection | None = None, method: bytes = b"GET"
) -> tuple[h11.Response, bytes]:
    """One response through an h11 client (which also checks its framing)."""
    if client is None:
        client = h11.Connection(h11.CLIENT)
        client.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
        client.send(h11.EndOfMessage())
    head: h11.Response | None = None
    body = b""
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA:
            client.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            return head, body
        else:
            raise AssertionError(f"unexpected {event!r}")


def header(resp: h11.Response, name: bytes) -> bytes | None:
    return dict(resp.headers).get(name)


async def get(
    addr: Address, target: str = "/hello", method: str = "GET"
) -> tuple[h11.Response, bytes]:
    stream = await connect(addr)
    async with stream:
        client = h11.Connection(h11.CLIENT)
        data = client.send(h11.Request(method=method, target=target, headers=[("host", "x")]))
        data += client.send(h11.EndOfMessage())
        await stream.send_all(data)
        return await read_response(stream, client)


async def raw_exchange(addr: Address, data: bytes) -> tuple[h11.Response, bytes]:
    stream = await connect(addr)
    async with stream:
        await stream.send_all(data)
        return await read_response(stream)


async def until_closed(stream: trio.SocketStream) -> bytes:
    """Everything the server sends until it closes (EOF or reset)."""
    got = b""
    try:
        while data := await stream.receive_some(65536):
            got += data
    except trio.BrokenResourceError:
        pass
    return got


def test_routes_methods_head_and_query() -> None:
    async def main() -> None:
        server = HttpServer(routes())
        async with running(server) as (addr,):
            resp, body = await get(addr, "/hello?x=1")
            assert (resp.status_code, body) == (200, b"hello x=1\n")
            assert header(resp, b"content-length") == b"10"
            resp, body = await get(addr, "/hello", method="HEAD")
            assert (resp.status_code, body, header(resp, b"content-length")) == (200, b"", b"7")
            resp, _ = await get(addr, "/nope")
            assert resp.status_code == 404
            resp, _ = await get(addr, "/hello", method="DELETE")
            assert resp.status_code == 405 and header(resp, b"allow") == b"GET, HEAD"
        assert server.responses == {200: 2, 404: 1, 405: 1}

    trio.run(main)


def test_post_body_and_keep_alive() -> None:
    async def main() -> None:
        async with running(HttpServer(routes())) as (addr,):
            stream = await connect(addr)
            async with stream:
                client = h11.Connection(h11.CLIENT)
                for payload in (b"one", b"x" * 5000):
                    data = client.send(
                        h11.Request(
                            method="POST",
                            target="/echo",
                            headers=[("host", "x"), ("content-length", str(len(payload)))],
                        )
                    )
                    data += client.send(h11.Data(data=payload))
                    data += client.send(h11.EndOfMessage())
                    await stream.send_all(data)
                    resp, body = await read_response(stream, client)
                    assert (resp.status_code, body) == (200, payload)
                    assert header(resp, b"connection") is None
                    client.start_next_cycle()

    trio.run(main)


def test_keep_alive_off_closes_after_each_response() -> None:
    async def main() -> None:
        async with running(HttpServer(routes(), limits=Limits(keep_alive=False))) as (addr,):
            stream = await connect(addr)
            async with stream:
                await stream.send_all(b"GET /hello HTTP/1.1\r\nhost: x\r\n\r\n" * 2)
                got = await until_closed(stream)
            assert got.count(b"HTTP/1.1 200") == 1 and b"connection: close" in got

    trio.run(main)


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /hello HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
        b"GET /hello HTTP/1.1\r\nhost: x\r\nbad header line\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64 + b"\r\n\r\n",  # TLS hello
        b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: x\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
    ],
)
def test_malformed_request_gets_400_and_server_lives(request_bytes: bytes) -> None:
    async def main() -> None:
        async with running(HttpServer(routes())) as (addr,):
            resp, _ = await raw_exchange(addr, request_bytes)
            assert resp.status_code == 400
            resp, _ = await get(addr)
            assert resp.status_code == 200

    trio.run(main)


def test_huge_headers_get_431() -> None:
    async def main() -> None:
        server = HttpServer(routes(), limits=Limits(max_header_bytes=4096))
        async with running(server) as (addr,):
            big = b"GET /hello HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 100_000 + b"\r\n\r\n"
            stream = await connect(addr)
            async with stream:
                # The server answers and closes long before the client has sent it all.
                with trio.move_on_after(5):
                    try:
                        await stream.send_all(big)
                    except trio.BrokenResourceError:
                        pass
                got = await until_closed(stream)
            assert got.startswith(b"HTTP/1.1 431 "), got[:100]
            # Many small headers that add up count too.
            many = b"".join(b"x-h%d: v\r\n" % i for i in range(1000))
            resp, _ = await raw_exchange(
                addr, b"GET /hello HTTP/1.1\r\nhost: x\r\n" + many + b"\r\n"
            )
            assert resp.status_code == 431
            resp, _ = await get(addr)
            assert resp.status_code == 200

    trio.run(main)


def test_large_body_gets_413_by_length_and_by_chunks() -> None:
    async def main() -> None:
        async with running(HttpServer(routes(), limits=Limits(max_body_bytes=1000))) as (addr,):
            resp, _ = await raw_exchange(
                addr, b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 1001\r\n\r\n"
            )
            assert resp.status_code == 413
            chunk = b"%x\r\n%s\r\n" % (600, b"y" * 600)
            resp, _ = await raw_exchange(
                addr,
                b"POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
                + chunk * 2
                + b"0\r\n\r\n",
            )
            assert resp.status_code == 413
            resp, body = await raw_exchange(
                addr,
                b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n" + b"z" * 1000,
            )
            assert (resp.status_code, body) == (200, b"z" * 1000)

    trio.run(main)


def test_slow_client_gets_408_within_the_request_timeout() -> None:
    async def main() -> None:
        limits = Limits(request_timeout=0.5)
        async with running(HttpServer(routes(), limits=limits)) as (addr,):
            # Slowloris: a byte every 0.1 s never completes the head.
            stream = await connect(addr)
            start = trio.current_time()
            async with stream:

                async def trickle() -> None:
                    try:
                        for byte in b"GET /hello HTTP/1.1\r\nx-slow: " + b"a" * 100:
                            await stream.send_all(bytes([byte]))
                            await trio.sleep(0.1)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(trickle)
                    got = await until_closed(stream)
                    nursery.cancel_scope.cancel()
            assert got.startswith(b"HTTP/1.1 408 "), got
            assert 0.45 <= trio.current_time() - start < 2.0
            # A client that connects and sends nothing is closed at the same bound.
            silent = await connect(addr)
            async with silent:
                with trio.fail_after(2):
                    await until_closed(silent)
            resp, _ = await get(addr)
            assert resp.status_code == 200

    trio.run(main)


def test_idle_keep_alive_connection_is_closed() -> None:
    async def main() -> None:
        async with running(HttpServer(routes(), limits=Limits(idle_timeout=0.3))) as (addr,):
            stream = await connect(addr)
            async with stream:
                await stream.send_all(b"GET /hello HTTP/1.1\r\nhost: x\r\n\r\n")
                with trio.fail_after(2):
                    got = await until_closed(stream)
            # Closed quietly after the idle bound: one response, no 408.
            assert got.count(b"HTTP/1.1 ") == 1 and got.startswith(b"HTTP/1.1 200")

    trio.run(main)


def test_failing_and_hanging_handlers() -> None:
    async def boom(req: Request) -> Response:
        raise RuntimeError("boom")

    async def hang(req: Request) -> Response:
        await trio.sleep_forever()
        raise AssertionError

    async def bad_status(req: Request) -> Response:
        return Response(99)

    async def main() -> None:
        server = HttpServer(routes(boom=boom), limits=Limits(handler_timeout=0.3))
        server.routes.update({"/boom": boom, "/hang": hang, "/bad": bad_status})
        async with running(server) as (addr,):
            assert (await get(addr, "/boom"))[0].status_code == 500
            assert (await get(addr, "/hang"))[0].status_code == 503
            stream = await connect(addr)
            async with stream:
                await stream.send_all(b"GET /bad HTTP/1.1\r\nhost: x\r\n\r\n")
                assert await until_closed(stream) == b""
            assert (await get(addr))[0].status_code == 200

    trio.run(main)


def test_too_many_connections_get_503() -> None:
    async def main() -> None:
        server = HttpServer(routes(), limits=Limits(max_connections=2))
        async with running(server) as (addr,):
            held = []
            for _ in range(2):  # two keep-alive connections, each answered once: held
                stream = await connect(addr)
                await stream.send_all(b"GET /hello HTTP/1.1\r\nhost: x\r\n\r\n")
                assert (await read_response(stream))[0].status_code == 200
                held.append(stream)
            assert server.active_connections == 2
            resp, _ = await get(addr)
            assert resp.status_code == 503
            for stream in held:
                await stream.aclose()
            await trio.testing.wait_all_tasks_blocked(0.05)  # the server reads the two EOFs
            assert server.active_connections == 0
            assert (await get(addr))[0].status_code == 200

    trio.run(main)


def test_graceful_stop_finishes_the_running_handler() -> None:
    async def main() -> None:
        entered = trio.Event()
        release = trio.Event()

        async def slow(req: Request) -> Response:
            entered.set()
            await release.wait()
            return text(200, "done\n")

        server = HttpServer(routes(slow=slow))
        server.routes["/slow"] = slow
        async with trio.open_nursery() as nursery:
            (addr,) = await nursery.start(server.serve, [("127.0.0.1", 0)])
            idle = await connect(addr)
            busy = await connect(addr)
            await busy.send_all(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n")
            await entered.wait()
            server.stop()
            with trio.fail_after(2):
                assert await until_closed(idle) == b""  # idle: closed at once
            with pytest.raises(OSError):
                await connect(addr)  # listener closed
            release.set()
            with trio.fail_after(2):
                got = await until_closed(busy)
            assert got.startswith(b"HTTP/1.1 200") and b"connection: close" in got
            assert got.endswith(b"done\n")
        # serve() returned by itself: the nursery exited without a cancel.

    trio.run(main)


def test_ipv6_and_several_addresses() -> None:
    async def main() -> None:
        async with running(HttpServer(routes()), [("127.0.0.1", 0), ("::1", 0)]) as bound:
            assert [a[0] for a in bound] == ["127.0.0.1", "::1"]
            assert all(port > 0 for _, port in bound)
            for addr in bound:
                assert (await get(addr))[0].status_code == 200

    trio.run(main)


def test_tls_wrap_with_stdlib_ssl(tmp_path: Path) -> None:
    files = make_pki(tmp_path)["a"]
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(files.cert, files.key)
    client_ctx = ssl.create_default_context(cafile=str(files.ca_cert))

    async def wrap(sock: trio.SocketStream) -> trio.SSLStream[trio.SocketStream]:
        return trio.SSLStream(sock, server_ctx, server_side=True)

    async def main() -> None:
        server = HttpServer(routes(), wrap=wrap, limits=Limits(request_timeout=1.0))
        async with running(server) as (addr,):
            stream = trio.SSLStream(await connect(addr), client_ctx, server_hostname="127.0.0.1")
            async with stream:
                await stream.send_all(b"GET /hello?tls HTTP/1.1\r\nhost: x\r\n\r\n")
                resp, body = await read_response(stream)
            assert (resp.status_code, body) == (200, b"hello tls\n")
            # Plaintext on the TLS port: the handshake fails, the server lives on.
            plain = await connect(addr)
            async with plain:
                await plain.send_all(b"GET /hello HTTP/1.1\r\nhost: x\r\n\r\n")
                with trio.fail_after(3):
                    await until_closed(plain)
            stream = trio.SSLStream(await connect(addr), client_ctx, server_hostname="127.0.0.1")
            async with stream:
                await stream.send_all(b"GET /hello HTTP/1.1\r\nhost: x\r\n\r\n")
                assert (await read_response(stream))[0].status_code == 200

    trio.run(main)
