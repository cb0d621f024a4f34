"""Two Sidecars on loopback, without the kernel redirection (no root needed).

A's egress listener plays the intercepted app connection; its "original
destination" is B's TLS listener.  B's ingress dials the test's app server.
The netns suite repeats the important cases through real TPROXY rules.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import trio
import trio.testing

from lab.chain import abort_socket_stream, contexts, expect_reset, read_to_eof, tls_pair
from lab.pki import PKI, make_pki, spiffe_id
from trio_tproxy import certs, tlspolicy
from trio_tproxy.config import (
    IdentityPolicy,
    Interception,
    Limits,
    ProxyConfig,
    Timeouts,
    TLSFiles,
)
from trio_tproxy.credentials import load_credentials
from trio_tproxy.plainstream import PlainStream
from trio_tproxy.proxy import Sidecar


def sidecar(
    files: TLSFiles,
    *,
    timeouts: Timeouts | None = None,
    identity: IdentityPolicy | None = None,
    tls_groups: str | None = None,
    limits: Limits | None = None,
    **kw,
) -> Sidecar:
    config = ProxyConfig(
        tls_groups=tls_groups,
        limits=limits or Limits(),
        tls=files,
        identity=identity or IdentityPolicy(),
        interception=Interception(),
        timeouts=timeouts or Timeouts(handshake=2, connect=2, half_close=10),
        verbosity=1,
    )
    return Sidecar(
        config,
        load_credentials(files),
        listen_hosts=("127.0.0.1",),
        kernel_options=False,
        ports=(0, 0),  # serve() reports what the kernel chose
        **kw,
    )


def egress_port(sidecar: Sidecar) -> int:
    return sidecar.bound["egress"][0][1]


def ingress_port(sidecar: Sidecar) -> int:
    return sidecar.bound["ingress"][0][1]


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, TLSFiles]:
    return make_pki(tmp_path, ("a", "b", "c"))


@asynccontextmanager
async def pods(
    a_files: TLSFiles, b_files: TLSFiles, app_port: int, a_kw: dict | None = None, **b_kw
) -> AsyncIterator[tuple[Sidecar, Sidecar]]:
    """Sidecar A (egress to B) and sidecar B (ingress to 127.0.0.1:app_port)."""
    b = sidecar(b_files, **b_kw)

    async def to_app(dst, client):  # noqa: ANN001 - the IngressDialer signature
        return PlainStream(await b.dial(("127.0.0.1", app_port)))

    b.ingress_dialer = to_app
    a = sidecar(
        a_files, egress_destination=lambda sock: ("127.0.0.1", ingress_port(b)), **(a_kw or {})
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(a.serve)
        bound = await nursery.start(b.serve)
        assert bound["ingress"] == b.bound["ingress"]
        yield a, b
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def echo_app() -> AsyncIterator[int]:
    """An app that echoes until EOF, then half-closes."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")

    async def echo(stream: trio.SocketStream) -> None:
        try:
            while data := await stream.receive_some():
                await stream.send_all(data)
            await stream.send_eof()
        except trio.BrokenResourceError:
            pass
        finally:
            await stream.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, echo, listeners)
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


async def connect(port: int) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", port)


def test_mtls_round_trip_logs_both_identities(pki, caplog):
    caplog.set_level(logging.INFO)

    async def main():
        async with echo_app() as app_port, pods(pki["a"], pki["b"], app_port) as (a, b):
            client = await connect(egress_port(a))
            await client.send_all(b"hello through mTLS")
            await client.send_eof()
            assert await read_to_eof(client) == b"hello through mTLS"
            await client.aclose()
            with trio.fail_after(5):
                while not (a.stats.connections and b.stats.connections):  # noqa: ASYNC110 - polls counters
                    await trio.sleep(0.01)
        assert a.stats.connections[("egress", "ok")] == 1
        assert b.stats.connections[("ingress", "ok")] == 1

    trio.run(main)
    lines = [r.getMessage() for r in caplog.records if r.name == "trio_tproxy.conn"]
    egress = next(line for line in lines if line.startswith("egress"))
    ingress = next(line for line in lines if line.startswith("ingress"))
    assert f"peer={spiffe_id('b')}" in egress and "TLSv1.3" in egress and "outcome=ok" in egress
    assert f"peer={spiffe_id('a')}" in ingress and "sent=18 received=18" in ingress


def test_server_of_another_trust_domain_is_refused(pki, tmp_path, caplog):
    # B's certificate comes from a second CA, in trust domain evil.org.
    ca2 = PKI(tmp_path, "ca2")
    evil = ca2.issue("evil", spiffe_ids=["spiffe://evil.org/ns/x/sa/b"])
    # A trusts both CAs so that only the identity check can refuse.
    bundle = tmp_path / "bundle.crt"
    bundle.write_bytes(pki["a"].ca_cert.read_bytes() + ca2.ca_path.read_bytes())
    a_files = replace(pki["a"], ca_cert=bundle)
    evil_files = replace(evil, ca_cert=bundle)

    async def main():
        async with (
            echo_app() as app_port,
            pods(
                a_files, evil_files, app_port, identity=IdentityPolicy(trust_domain="evil.org")
            ) as (a, b),
        ):
            client = await connect(egress_port(a))
            await client.send_all(b"secret")
            await expect_reset(client)
            await client.aclose()
        assert a.stats.connections[("egress", "refused")] == 1
        assert sum(a.stats.refusals.values()) == 1

    caplog.set_level(logging.WARNING)
    trio.run(main)
    refusal = next(
        r.getMessage()
        for r in caplog.records
        if "refused" in r.getMessage() and r.getMessage().startswith("egress")
    )
    assert "wrong trust domain" in refusal and "spiffe://evil.org/ns/x/sa/b" in refusal


@pytest.mark.parametrize(
    "garbage", [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x00" * 100, b"\x16\x03\x01\x00\x05hello"]
)
def test_garbage_on_tls_port_is_refused_and_others_carry_on(pki, caplog, garbage):
    caplog.set_level(logging.WARNING)

    async def main():
        async with echo_app() as app_port, pods(pki["a"], pki["b"], app_port) as (a, b):
            bad = await connect(ingress_port(b))
            await bad.send_all(garbage)
            received = b""
            with trio.fail_after(5):  # the sidecar ends it: an alert and FIN, or a reset
                try:
                    while data := await bad.receive_some():
                        received += data
                except trio.BrokenResourceError:
                    pass
            assert garbage not in received, "the garbage reached the (echo) app"
            await bad.aclose()
            good = await connect(egress_port(a))
            await good.send_all(b"still fine")
            await good.send_eof()
            assert await read_to_eof(good) == b"still fine"
            await good.aclose()
            assert b.stats.connections[("ingress", "refused")] == 1

    trio.run(main)
    assert any(
        "ingress" in r.getMessage() and "TLS handshake failed" in r.getMessage()
        for r in caplog.records
    )


def test_client_without_certificate_is_refused(pki, caplog):
    caplog.set_level(logging.WARNING)
    from OpenSSL import SSL

    async def main():
        async with echo_app() as app_port, pods(pki["a"], pki["b"], app_port) as (a, b):
            ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
            ctx.load_verify_locations(str(pki["a"].ca_cert))
            sock = trio.socket.socket()
            await sock.connect(("127.0.0.1", ingress_port(b)))
            from trio_tproxy.tlsstream import TLSStream

            tls = TLSStream(sock, tlspolicy.new_connection(ctx, sock, server=False))
            await tls.do_handshake()  # TLS 1.3: the client learns of the refusal on read
            with pytest.raises(trio.BrokenResourceError):
                with trio.fail_after(5):
                    await tls.receive_some()
            await tls.aclose()
            assert b.stats.connections[("ingress", "refused")] == 1

    trio.run(main)
    assert any("no client certificate" in r.getMessage() for r in caplog.records)


def test_slow_handshake_times_out(pki, caplog):
    caplog.set_level(logging.WARNING)

    async def main():
        async with (
            echo_app() as app_port,
            pods(pki["a"], pki["b"], app_port, timeouts=Timeouts(handshake=0.5, connect=1)) as (
                a,
                b,
            ),
        ):
            silent = await connect(ingress_port(b))
            with trio.fail_after(5):
                with pytest.raises(trio.BrokenResourceError):
                    await silent.receive_some()
            await silent.aclose()
            assert b.stats.connections[("ingress", "refused")] == 1

    trio.run(main)
    assert any("timed out after 0.5s" in r.getMessage() for r in caplog.records)


def test_unreachable_upstream_resets_the_app(pki, caplog):
    caplog.set_level(logging.WARNING)
    # Bound but not listening: held for the whole test, so nobody else can take it.
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]

    async def main():
        a = sidecar(pki["a"], egress_destination=lambda sock: ("127.0.0.1", closed_port))
        async with trio.open_nursery() as nursery:
            await nursery.start(a.serve)
            client = await connect(egress_port(a))
            await expect_reset(client)
            await client.aclose()
            nursery.cancel_scope.cancel()
        assert a.stats.connections[("egress", "refused")] == 1

    try:
        trio.run(main)
    finally:
        closed.close()
    assert any("ECONNREFUSED" in r.getMessage() for r in caplog.records)


def test_app_reset_reaches_remote_app_as_reset(pki):
    async def main():
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        app_port = listeners[0].socket.getsockname()[1]
        async with pods(pki["a"], pki["b"], app_port) as (a, b):
            client = await connect(egress_port(a))
            await client.send_all(b"x")
            server = await listeners[0].accept()
            assert await server.receive_some() == b"x"
            await abort_socket_stream(server)
            await expect_reset(client)
            await client.aclose()
        await listeners[0].aclose()

    trio.run(main)


def test_tls_pair_helper_verifies_identities(pki):
    """The helper used by the relay tests really runs mutual TLS."""

    async def main():
        a, b = contexts(pki["a"]), contexts(pki["b"])
        client, server = await tls_pair(a.client, b.server)
        assert tlspolicy.verify_server(
            client.conn, IdentityPolicy(), "127.0.0.1"
        ).spiffe_id == spiffe_id("b")
        assert tlspolicy.verify_client(server.conn, IdentityPolicy()).spiffe_id == spiffe_id("a")
        await client.aclose()
        await server.aclose()

    trio.run(main)


def test_second_connection_resumes_the_tls_session(pki, caplog):
    """TLS 1.3 resumption between sidecars; the identity is checked every time."""
    caplog.set_level(logging.INFO)

    async def main():
        async with echo_app() as app_port, pods(pki["a"], pki["b"], app_port) as (a, b):
            for done in range(1, 4):
                client = await connect(egress_port(a))
                await client.send_all(b"again")
                await client.send_eof()
                assert await read_to_eof(client) == b"again"
                await client.aclose()
                with trio.fail_after(5):
                    while sum(a.stats.connections.values()) < done:  # noqa: ASYNC110
                        await trio.sleep(0.01)
            assert len(a.sessions) == 1

    trio.run(main)
    egress = [
        r.getMessage()
        for r in caplog.records
        if r.name == "trio_tproxy.conn" and r.getMessage().startswith("egress")
    ]
    ingress = [
        r.getMessage()
        for r in caplog.records
        if r.name == "trio_tproxy.conn" and r.getMessage().startswith("ingress")
    ]
    assert "handshake=full" in egress[0]
    assert all("handshake=resumed" in line for line in egress[1:]), egress
    assert all(f"peer={spiffe_id('b')}" in line for line in egress)
    assert all(f"peer={spiffe_id('a')}" in line for line in ingress)


def test_classic_key_exchange_groups_interoperate(pki):
    """--tls-groups X25519:P-256 on one side still meets the default on the other."""

    async def main():
        async with (
            echo_app() as app_port,
            pods(pki["a"], pki["b"], app_port, tls_groups="X25519:P-256") as (a, b),
        ):
            client = await connect(egress_port(a))
            await client.send_all(b"classic")
            await client.send_eof()
            assert await read_to_eof(client) == b"classic"
            await client.aclose()

    trio.run(main)


def test_key_exchange_groups_are_applied_not_ignored(pki, caplog):
    """Disjoint --tls-groups on the two sides cannot meet: the flag really reaches OpenSSL."""
    caplog.set_level(logging.WARNING)

    async def main():
        async with (
            echo_app() as app_port,
            pods(
                pki["a"], pki["b"], app_port, a_kw={"tls_groups": "P-256"}, tls_groups="X25519"
            ) as (a, b),
        ):
            client = await connect(egress_port(a))
            await client.send_all(b"classic")
            await expect_reset(client)
            await client.aclose()
            assert a.stats.connections[("egress", "refused")] == 1

    trio.run(main)
    assert any("TLS handshake failed" in r.getMessage() for r in caplog.records)


# --- every connection logged and counted once; addresses from accept() -----------------


async def wait_for(predicate, within: float = 5.0) -> None:  # noqa: ANN001
    with trio.fail_after(within):
        while not predicate():  # noqa: ASYNC110 - polls counters the handlers update
            await trio.sleep(0.005)


def test_cancellation_logs_and_counts_live_connections(pki, caplog):
    """SIGTERM cancels the sidecars: a relayed connection and one still in its
    handshake are each logged and counted once, as cancelled."""
    caplog.set_level(logging.INFO)

    async def main():
        async with echo_app() as app_port:
            async with pods(pki["a"], pki["b"], app_port) as (a, b):
                client = await connect(egress_port(a))
                await client.send_all(b"live")
                assert await client.receive_some() == b"live"  # relayed by both
                silent = await connect(ingress_port(b))  # never says hello
                await wait_for(lambda: b.stats.active == 2)
            # leaving `pods` cancelled both sidecars, as SIGTERM does
            assert a.stats.connections == {("egress", "cancelled"): 1}
            assert b.stats.connections == {("ingress", "cancelled"): 2}
            assert a.stats.active == b.stats.active == 0
            await expect_reset(client)
            await client.aclose()
            await silent.aclose()

    trio.run(main)
    lines = [r.getMessage() for r in caplog.records if r.name == "trio_tproxy.conn"]
    assert len(lines) == 3, lines
    assert all("outcome=cancelled" in line for line in lines)
    assert sum("before the relay started" in line for line in lines) == 1
    assert sum(f"peer={spiffe_id('b')}" in line and "sent=4" in line for line in lines) == 1


def test_source_address_comes_from_accept_even_after_a_reset(pki, caplog):
    """The peer resets before the handler runs: getpeername() would fail."""
    caplog.set_level(logging.WARNING)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, not listening: connecting there is refused

    async def main():
        a = sidecar(pki["a"], egress_destination=lambda sock: closed.getsockname())
        async with trio.open_nursery() as nursery:
            await nursery.start(a.serve)
            # Blocking calls, no checkpoint: the sidecar accepts only after the reset.
            app = socket.create_connection(("127.0.0.1", egress_port(a)))
            src = app.getsockname()
            app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            app.close()
            await wait_for(lambda: a.stats.connections[("egress", "refused")] == 1)
            nursery.cancel_scope.cancel()
        return src

    try:
        src = trio.run(main)
    finally:
        closed.close()
    refusal = next(r.getMessage() for r in caplog.records if "refused" in r.getMessage())
    assert refusal.startswith(f"egress 127.0.0.1:{src[1]} -> "), refusal


def test_egress_to_the_sidecars_own_listener_is_refused_once(pki, caplog):
    """An app dialing the egress port directly (e.g. [::1]:1 in a pod): TPROXY's
    original destination is then the listener itself.  Dialing it would loop."""
    caplog.set_level(logging.WARNING)

    async def main():
        a = sidecar(pki["a"], egress_destination=lambda sock: _addr(sock.getsockname()))
        async with trio.open_nursery() as nursery:
            await nursery.start(a.serve)
            client = await connect(egress_port(a))
            await expect_reset(client)
            await client.aclose()
            await wait_for(lambda: sum(a.stats.connections.values()) >= 1)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        assert a.stats.connections == {("egress", "refused"): 1}

    trio.run(main)
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1 and "own listener" in refusals[0], refusals


def _addr(name: object) -> tuple[str, int]:
    assert isinstance(name, tuple)
    return str(name[0]), int(name[1])


@pytest.mark.parametrize("kind", ["rogue-ca", "expired", "not-yet-valid"])
def test_refusal_names_the_certificate_that_was_presented(tmp_path, caplog, kind):
    """A refused client certificate is named in the refusal line (not "no certificate")."""
    import datetime as dt

    from OpenSSL import SSL

    from trio_tproxy.tlsstream import TLSStream

    caplog.set_level(logging.WARNING)
    now = dt.datetime.now(dt.UTC)
    ca = certs.make_ca()  # the mesh CA, this time with its key at hand
    certs.write_cert(tmp_path / "ca.crt", ca[0])
    files = {}
    for name in ("a", "b"):
        cert, key = certs.issue(*ca, spiffe_ids=[spiffe_id(name)], ips=["127.0.0.1"])
        certs.write_cert(tmp_path / f"{name}.crt", cert)
        certs.write_key(tmp_path / f"{name}.key", key)
        files[name] = TLSFiles(
            tmp_path / f"{name}.crt", tmp_path / f"{name}.key", tmp_path / "ca.crt"
        )
    if kind == "rogue-ca":
        leaf, key = certs.issue(*certs.make_ca("rogue CA"), spiffe_ids=[spiffe_id("mallory")])
        expected = "unknown CA"
    else:
        day = dt.timedelta(days=1)
        window = (now - 3 * day, now - day) if kind == "expired" else (now + day, now + 3 * day)
        leaf, key = certs.issue(
            *ca, spiffe_ids=[spiffe_id("mallory")], not_before=window[0], not_after=window[1]
        )
        expected = "certificate expired" if kind == "expired" else "certificate not yet valid"
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.load_verify_locations(str(tmp_path / "ca.crt"))
    ctx.use_certificate(leaf)
    ctx.use_privatekey(key)

    async def main():
        async with echo_app() as app_port, pods(files["a"], files["b"], app_port) as (a, b):
            sock = trio.socket.socket()
            await sock.connect(("127.0.0.1", ingress_port(b)))
            tls = TLSStream(sock, tlspolicy.new_connection(ctx, sock, server=False))
            with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
                await tls.do_handshake()
                await tls.receive_some()  # TLS 1.3: the refusal arrives on read
            await tls.aclose()
            await wait_for(lambda: b.stats.connections[("ingress", "refused")] == 1)

    trio.run(main)
    refusal = next(r.getMessage() for r in caplog.records if "refused" in r.getMessage())
    assert expected in refusal, refusal
    assert "presented no certificate" not in refusal
    assert f"presented {spiffe_id('mallory')}" in refusal, refusal
    assert ("issuer CN='rogue CA'" in refusal) == (kind == "rogue-ca"), refusal


class _FakeListener:
    """accept() fails with ``errors`` in turn, then waits forever."""

    def __init__(self, errors: list[OSError]) -> None:
        self.errors = errors
        self.calls = 0

    async def accept(self) -> tuple[object, object]:
        self.calls += 1
        await trio.lowlevel.checkpoint()
        if self.errors:
            raise self.errors.pop(0)
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", 1)


def test_accept_loop_waits_out_capacity_errors_with_one_warning(caplog):
    import errno

    from trio_tproxy.proxy import accept_loop

    caplog.set_level(logging.WARNING)
    emfile = [OSError(errno.EMFILE, "Too many open files") for _ in range(5)]
    listener = _FakeListener([*emfile, OSError(errno.ENOBUFS, "No buffer space")])

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(accept_loop, listener, None)
            await trio.sleep(1)  # virtual time (MockClock): room for six 0.1 s pauses
            await trio.testing.wait_all_tasks_blocked()
            assert listener.calls == 7  # it slept and retried after each error
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "EMFILE" in warnings[0].getMessage()
    assert warnings[0].exc_info is None


def test_accept_loop_lets_other_errors_propagate():
    import errno

    from trio_tproxy.proxy import accept_loop

    async def main():
        await accept_loop(_FakeListener([OSError(errno.EBADF, "Bad file descriptor")]), None)

    with pytest.raises(BaseExceptionGroup) as caught:  # from the loop's handler nursery
        trio.run(main)
    assert caught.value.subgroup(lambda e: isinstance(e, OSError) and e.errno == errno.EBADF)


def test_accepted_sockets_have_nodelay() -> None:
    """Set on the listener, inherited by every accepted socket: Nagle off on both legs
    (with it, the TLS server's handshake flight and its tickets waited ~40 ms for an ACK)."""
    import socket as stdsocket

    from trio_tproxy.proxy import open_listener

    async def main() -> None:
        listener = await open_listener("127.0.0.1", 0, transparent=False, mark=None)
        with listener:
            client = trio.socket.socket()
            with client:
                await client.connect(listener.getsockname())
                accepted, _ = await listener.accept()
                with accepted:
                    nodelay = accepted.getsockopt(stdsocket.IPPROTO_TCP, stdsocket.TCP_NODELAY)
                    assert nodelay == 1

    trio.run(main)


def test_dial_waits_for_a_connect_that_does_not_complete_at_once(pki) -> None:
    """Most dials are connected when connect() returns (loopback, veth); the others
    wait for the socket to become writable, within the connect timeout.  A listener
    whose accept queue is full drops SYNs: the dial waits until a slot frees."""
    from trio_tproxy.proxy import Refused

    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)  # room for one connection not yet accepted
    addr = full.getsockname()
    queued = [socket.create_connection(addr)]

    async def main() -> None:
        quick = sidecar(pki["a"], timeouts=Timeouts(connect=0.3))
        start = trio.current_time()
        with pytest.raises(Refused, match=r"^connect to 127\.0\.0\.1:\d+ timed out after 0\.3s$"):
            await quick.dial(addr)
        assert trio.current_time() - start >= 0.3
        patient = sidecar(pki["a"], timeouts=Timeouts(connect=10))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, lambda: full.accept()[0].close())
            with trio.fail_after(8):  # the SYN is sent again after 1 s, then 3 s
                sock = await patient.dial(addr)
        with sock:
            assert sock.getpeername() == addr

    try:
        trio.run(main)
    finally:
        for s in queued:
            s.close()
        full.close()
