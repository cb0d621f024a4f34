"""Limits without the kernel: the admission counters, the warning throttle, the
open-file limit, and the limits through two loopback sidecars."""

from __future__ import annotations

import logging
import resource

import pytest
import trio
import trio.testing
from test_proxy import connect, echo_app, egress_port, ingress_port, pods, wait_for

from lab.chain import expect_reset
from lab.pki import make_pki
from trio_tproxy import limits
from trio_tproxy.config import ConfigError, Limits, Timeouts


def test_admission_counts_and_refuses_by_kind():
    adm = limits.Admission(Limits(max_connections=4, max_pending_handshakes=3,
                                  max_pending_per_source=2))  # fmt: skip
    assert adm.admit("x", pending=True) is None
    assert adm.admit("x", pending=True) is None
    assert adm.admit("x", pending=True) == limits.MAX_PENDING_PER_SOURCE
    assert adm.admit("y", pending=True) is None
    assert adm.admit("z", pending=True) == limits.MAX_PENDING
    assert adm.admit("z", pending=False) is None  # egress: only the global cap
    assert adm.admit("z", pending=False) == limits.MAX_CONNECTIONS
    for src in ("x", "x", "y"):
        adm.authenticated(src)
    assert adm.pending == 0 and not adm.pending_by_source  # no entry per source left behind
    for _ in range(4):
        adm.closed()
    assert adm.active == 0


def test_admission_asks_for_a_trim_only_after_a_burst():
    adm = limits.Admission(Limits())
    for _ in range(limits.TRIM_AFTER - 1):
        adm.admit("x", pending=False)
    for _ in range(limits.TRIM_AFTER - 1):
        adm.closed()
    assert adm.burst_ended() is False  # 255 let go: no burst
    for _ in range(limits.TRIM_AFTER + 10):
        adm.admit("x", pending=False)
    assert adm.burst_ended() is False  # still held
    for _ in range(limits.TRIM_AFTER):
        adm.closed()
    assert adm.burst_ended() is True
    assert adm.burst_ended() is False  # once per burst


def test_throttle_one_line_per_kind_per_interval():
    t = limits.Throttle(every=10)
    assert t.due("a", 0.0) == 0
    assert t.due("a", 1.0) is None and t.due("a", 2.0) is None
    assert t.due("b", 2.0) == 0  # another kind has its own line
    assert t.due("a", 10.5) == 2  # the next line says how many were kept quiet


@pytest.mark.parametrize(
    "bad", [{"max_connections": 0}, {"max_pending_handshakes": -1},
            {"max_pending_per_source": True}],
)  # fmt: skip
def test_limits_are_validated(bad):
    with pytest.raises(ConfigError, match=next(iter(bad)).replace("_", "-")):
        Limits(**bad)
    with pytest.raises(ConfigError, match="--idle-timeout"):
        Timeouts(idle=0)


def test_raise_fd_limit_goes_to_the_hard_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 256), hard))
        assert limits.raise_fd_limit() == (hard, hard)
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# --- through two loopback sidecars ---------------------------------------------------


@pytest.fixture
def pki(tmp_path):
    return make_pki(tmp_path, ("a", "b"))


def test_connection_over_max_connections_is_reset_at_accept_with_one_line(pki, caplog):
    """B holds 3 connections; the next ones are reset before any TLS, one warning line,
    every refusal counted; the first 3 keep working and a 4th works once one closed."""
    caplog.set_level(logging.WARNING)

    async def main():
        async with (
            echo_app() as app_port,
            pods(pki["a"], pki["b"], app_port, limits=Limits(max_connections=3)) as (a, b),
        ):
            held = []
            for _ in range(3):
                c = await connect(egress_port(a))
                await c.send_all(b"held")
                assert await c.receive_some() == b"held"
                held.append(c)
            for _ in range(3):
                extra = await connect(egress_port(a))
                try:
                    await extra.send_all(b"one too many")
                    await expect_reset(extra)
                except trio.BrokenResourceError:
                    pass  # reset before our send (A's dial to B met the RST at once)
                await extra.aclose()
            assert b.stats.refusals[("ingress", limits.MAX_CONNECTIONS)] == 3
            for c in held:  # the first three carry on
                await c.send_all(b"still")
                assert await c.receive_some() == b"still"
            await held.pop().aclose()
            await wait_for(lambda: b.admission.active == 2)
            again = await connect(egress_port(a))
            await again.send_all(b"room again")
            assert await again.receive_some() == b"room again"
            for c in [*held, again]:
                await c.aclose()

    trio.run(main)
    lines = [r for r in caplog.records if "refused at accept" in r.getMessage()]
    assert len(lines) == 1 and "--max-connections 3" in lines[0].getMessage(), lines
    assert all(r.exc_info is None for r in caplog.records)


def test_pending_per_source_refuses_the_flooder_not_others(pki, caplog):
    """Silent connections (no ClientHello) fill their source's pending quota; more from
    that source are reset at accept; a sidecar's connection from elsewhere still works;
    the quota frees as the handshakes time out."""
    caplog.set_level(logging.WARNING)

    async def main():
        async with (
            echo_app() as app_port,
            pods(
                pki["a"],
                pki["b"],
                app_port,
                limits=Limits(max_pending_per_source=5),
                timeouts=Timeouts(handshake=1, connect=2, half_close=10),
            ) as (a, b),
        ):
            # The flooder: 127.0.0.2 (A's sidecar dials from 127.0.0.1).
            silent = []
            for _ in range(20):
                s = trio.socket.socket()
                await s.bind(("127.0.0.2", 0))
                silent.append(s)
                try:
                    await s.connect(("127.0.0.1", ingress_port(b)))
                except ConnectionResetError:
                    pass  # refused so fast that connect() saw the reset
            await wait_for(
                lambda: b.stats.refusals[("ingress", limits.MAX_PENDING_PER_SOURCE)] == 15
            )
            assert b.admission.pending_by_source["127.0.0.2"] == 5
            c = await connect(egress_port(a))
            await c.send_all(b"legit")
            assert await c.receive_some() == b"legit"
            await c.aclose()
            await wait_for(lambda: b.admission.pending == 0, within=5)  # handshake timeouts
            for s in silent:
                s.close()

    trio.run(main)
    lines = [r.getMessage() for r in caplog.records if "refused at accept" in r.getMessage()]
    assert len(lines) == 1 and "from 127.0.0.2" in lines[0], lines
