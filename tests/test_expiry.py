"""Issue 8, finding 8: trust never outlives a certificate through resumption.

Two loopback sidecars with certificates valid for a few seconds (lab.pki): A
resumes its TLS session to B, the certificate expires, and the next connection
must not ride the old session, in either role.  Plus the ticket lifetime, the
cache's own bounds and clear().
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import pytest
import trio
from test_proxy import connect, echo_app, egress_port, pods, wait_for

from lab.chain import expect_reset, read_to_eof
from lab.pki import PKI, spiffe_id
from trio_tproxy import tlspolicy
from trio_tproxy.credentials import load_credentials
from trio_tproxy.sessions import SESSION_LIFETIME, SessionCache

#: Seconds the short-lived certificate has left when the test starts.
LIFE = 3


def short_lived(tmp_path: Path, which: str):
    """Files for a and b from one CA; ``which`` gets a certificate valid LIFE more seconds."""
    ca = PKI(tmp_path)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    files = {}
    for name in ("a", "b"):
        window = {}
        if name == which:
            window = {"not_before": now - dt.timedelta(hours=1),
                      "not_after": now + dt.timedelta(seconds=LIFE)}  # fmt: skip
        files[name] = ca.issue(
            name, spiffe_ids=[spiffe_id(name)], ips=["127.0.0.1", "::1"], **window
        )
    return files, now + dt.timedelta(seconds=LIFE)


async def round_trip(a, message: bytes) -> None:
    client = await connect(egress_port(a))
    await client.send_all(message)
    await client.send_eof()
    assert await read_to_eof(client) == message
    await client.aclose()


async def refused(a) -> None:
    client = await connect(egress_port(a))
    await client.send_all(b"after expiry")
    await expect_reset(client)
    await client.aclose()


async def sleep_past(when: dt.datetime) -> None:
    """Until ``when`` (UTC) has passed for OpenSSL too (it compares whole seconds)."""
    await trio.sleep(max(0.0, (when - dt.datetime.now(dt.UTC)).total_seconds()) + 1.1)


def conn_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("trio_tproxy")]


def test_client_does_not_resume_to_a_server_whose_certificate_expired(tmp_path, caplog):
    """B's certificate expires while A holds a session: A makes a full handshake, which
    OpenSSL refuses (the session would have let B in: it skips the certificate checks)."""
    caplog.set_level(logging.INFO)
    files, expires = short_lived(tmp_path, "b")

    async def main():
        async with echo_app() as app_port, pods(files["a"], files["b"], app_port) as (a, b):
            await round_trip(a, b"first")
            await wait_for(lambda: len(a.sessions) == 1)
            await round_trip(a, b"resumed")
            await sleep_past(expires)
            await refused(a)
            await wait_for(lambda: a.stats.connections[("egress", "refused")] == 1)

    trio.run(main)
    lines = conn_lines(caplog)
    egress = [line for line in lines if line.startswith("egress")]
    assert "handshake=full" in egress[0] and "handshake=resumed" in egress[1], egress
    refusal = egress[2]
    assert "refused" in refusal and "certificate expired" in refusal, refusal
    assert "resumed session" not in refusal, "A offered the stale session: " + refusal


def test_server_refuses_a_resumed_session_of_an_expired_client_certificate(tmp_path, caplog):
    """A's certificate expires while it holds a session to B: A still offers it (it only
    checks B's certificate), and B must refuse it instead of resuming."""
    caplog.set_level(logging.INFO)
    files, expires = short_lived(tmp_path, "a")

    async def main():
        async with echo_app() as app_port, pods(files["a"], files["b"], app_port) as (a, b):
            await round_trip(a, b"first")
            await wait_for(lambda: len(a.sessions) == 1)
            await round_trip(a, b"resumed")
            await sleep_past(expires)
            await refused(a)
            await wait_for(lambda: b.stats.connections[("ingress", "refused")] == 1)
            assert b.stats.connections[("ingress", "ok")] == 2

    trio.run(main)
    lines = conn_lines(caplog)
    refusal = next(line for line in lines if line.startswith("ingress") and "refused" in line)
    assert "certificate expired" in refusal and "resumed session" in refusal, refusal


def test_server_tickets_live_session_lifetime_not_7200s(tmp_path):
    files, _ = short_lived(tmp_path, "none")
    ctx = tlspolicy.server_context(load_credentials(files["b"]))
    assert ctx.get_timeout() == SESSION_LIFETIME == 300


class _Conn:
    def __init__(self) -> None:
        self.offered = None

    def set_session(self, session) -> None:
        self.offered = session

    def get_session(self):
        return "session"


def test_session_cache_bounds_and_clear():
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    gone = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    cache = SessionCache(lifetime=3600)
    cache.keep(_Conn(), ("10.0.0.1", 1), later, resumed=False)
    cache.keep(_Conn(), ("10.0.0.2", 1), gone, resumed=False)
    conn = _Conn()
    cache.offer(conn, ("10.0.0.1", 1))
    assert conn.offered == "session"
    conn = _Conn()
    cache.offer(conn, ("10.0.0.2", 1))
    assert conn.offered is None and len(cache) == 1  # expired peer: dropped
    cache.clear()
    assert len(cache) == 0
    old = SessionCache(lifetime=0)
    old.keep(_Conn(), ("10.0.0.1", 1), later, resumed=False)
    conn = _Conn()
    old.offer(conn, ("10.0.0.1", 1))
    assert conn.offered is None  # past its lifetime: a full handshake


@pytest.mark.parametrize("resumed", [True, False])
def test_a_resumed_session_keeps_the_age_of_its_full_handshake(monkeypatch, resumed):
    import trio_tproxy.sessions as sessions

    clock = [100.0]
    monkeypatch.setattr(sessions.time, "monotonic", lambda: clock[0])
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    cache = SessionCache(lifetime=300)
    cache.keep(_Conn(), ("10.0.0.1", 1), later, resumed=False)
    clock[0] = 350.0
    cache.keep(_Conn(), ("10.0.0.1", 1), later, resumed=resumed)
    clock[0] = 450.0  # 350 s after the full handshake, 100 s after the resumption
    conn = _Conn()
    cache.offer(conn, ("10.0.0.1", 1))
    assert (conn.offered is None) == resumed
