"""trio_tproxy.dtls without sockets: framing, cookies, handshakes, datagram semantics.

Two associations talk through memory channels, so every datagram is in the
test's hands: it can drop, reorder, replay or forge them. The kernel path
(real sockets, nft, two sidecars) is tests/test_udp.py.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from lab import pki
from trio_tproxy import dtls
from trio_tproxy.config import IdentityPolicy
from trio_tproxy.credentials import load_credentials

MTU = 1472
POLICY = IdentityPolicy()


def in_trio(test):
    """Run an async test under trio (real clock: OpenSSL's DTLS timer is wall-clock)."""

    @functools.wraps(test)
    def run(*args, **kwargs):
        trio.run(functools.partial(test, *args, **kwargs))

    return run


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dtls.Contexts]:
    directory: Path = tmp_path_factory.mktemp("dtls-pki")
    files = pki.make_pki(directory)
    rogue = pki.PKI(directory, "rogue-ca", common_name="rogue CA")
    files["rogue"] = rogue.issue(
        "rogue", spiffe_ids=[pki.spiffe_id("a")], trust=pki.PKI(directory / "x")
    )
    out = {name: dtls.contexts(load_credentials(f)) for name, f in files.items() if name != "rogue"}
    # the rogue's own context trusts our CA (it accepts us); ours do not trust it
    rogue_files = files["rogue"]
    out["rogue"] = dtls.contexts(
        load_credentials(type(rogue_files)(rogue_files.cert, rogue_files.key, files["a"].ca_cert))
    )
    return out


# --- framing ---------------------------------------------------------------------------


def record(body: bytes, kind: int = 23) -> bytes:
    return bytes([kind, 0xFE, 0xFD]) + bytes(8) + len(body).to_bytes(2, "big") + body


@given(st.lists(st.binary(max_size=300), max_size=12), st.integers(min_value=13, max_value=1500))
def test_split_then_pack_keeps_every_record_whole_and_in_order(bodies, mtu):
    records = [record(b) for b in bodies]
    assert dtls.split_records(b"".join(records)) == records
    datagrams = dtls.pack_datagrams(records, mtu)
    assert b"".join(datagrams) == b"".join(records)
    for datagram in datagrams:
        parts = dtls.split_records(datagram)
        assert len(datagram) <= mtu or len(parts) == 1  # only a lone record may exceed it


def test_split_keeps_a_truncated_tail():
    assert dtls.split_records(record(b"abc") + b"\x17\xfe") == [record(b"abc"), b"\x17\xfe"]


@pytest.mark.parametrize(
    ("proto", "port"),
    [
        (b"udp/53", 53),
        (b"udp/65535", 65535),
        (b"udp/0", None),
        (b"udp/65536", None),
        (b"udp/", None),
        (b"udp/-1", None),
        (b"h2", None),
        (None, None),
        (b"udp/000053", None),
    ],
)
def test_port_from_alpn(proto, port):
    assert dtls.port_from_alpn(proto) == port


def test_cookies_bind_the_flow():
    cookies = dtls.Cookies(b"k" * 32)
    flow = dtls.flow_bytes(("10.0.0.1", 5000), ("10.0.0.2", 2))
    other = dtls.flow_bytes(("10.0.0.9", 5000), ("10.0.0.2", 2))
    assert cookies.check(flow, cookies.make(flow))
    assert not cookies.check(other, cookies.make(flow))
    assert not dtls.Cookies(b"j" * 32).check(flow, cookies.make(flow))


# --- associations over memory channels -----------------------------------------------


class Wire:
    """Client -> server and server -> client datagram queues the test can tamper with."""

    def __init__(self) -> None:
        self.c2s_send, self.c2s = trio.open_memory_channel[bytes](1000)
        self.s2c_send, self.s2c = trio.open_memory_channel[bytes](1000)
        self.cookies_sent = 0


async def handshake(
    contexts: dict[str, dtls.Contexts], client: str = "a", server: str = "b", port: int = 7200
) -> tuple[dtls.Association, dtls.Association]:
    wire = Wire()
    conn = dtls.new_connection(contexts[client].client, server=False, flow=b"", mtu=MTU)
    conn.set_alpn_protos([dtls.alpn_for_port(port)])
    c = dtls.Association(conn, MTU)
    result: dict[str, dtls.Association] = {}

    async def run_client() -> None:
        await c.handshake(
            wire.s2c.receive,
            wire.c2s_send.send,
            timeout=5,
            verify=dtls.verifier_for_server(POLICY, "127.0.0.1"),
        )

    async def run_server() -> None:
        flow = dtls.flow_bytes(("127.0.0.1", 40000), ("127.0.0.1", 2))
        while True:
            hello = await wire.c2s.receive()
            sconn, replies = dtls.listen(contexts[server].server, hello, flow, MTU)
            if sconn is not None:
                break
            for reply in replies:
                await wire.s2c_send.send(reply)
        s = dtls.Association(sconn, MTU)
        await s.handshake(
            wire.c2s.receive, wire.s2c_send.send, timeout=5, verify=dtls.verifier_for_client(POLICY)
        )
        result["s"] = s

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_client)
        nursery.start_soon(run_server)
    return c, result["s"]


@in_trio
async def test_handshake_verifies_both_identities_and_carries_the_port(creds):
    c, s = await handshake(creds, port=5353)
    assert c.peer is not None and c.peer.spiffe_id == pki.spiffe_id("b")
    assert s.peer is not None and s.peer.spiffe_id == pki.spiffe_id("a")
    assert dtls.port_from_alpn(s.conn.get_alpn_proto_negotiated()) == 5353
    assert c.info.startswith("DTLSv1.2 ") and s.info == c.info
    # AES-GCM: 13-byte header, 8-byte explicit nonce, 16-byte tag
    assert c.cleartext_mtu == MTU - 37


@in_trio
async def test_a_client_from_a_rogue_ca_is_refused(creds):
    with pytest.raises(ExceptionGroup) as info:
        await handshake(creds, client="rogue")
    reasons = sorted(str(e) for e in info.value.exceptions)
    assert all(isinstance(e, dtls.HandshakeError) for e in info.value.exceptions)
    # the server names the rogue certificate; the client reads the server's alert
    assert any("unknown CA" in r and "issuer CN='rogue CA'" in r for r in reasons), reasons


@in_trio
async def test_a_first_clienthello_gets_only_a_cookie(creds):
    conn = dtls.new_connection(creds["a"].client, server=False, flow=b"", mtu=MTU)
    conn.set_alpn_protos([dtls.alpn_for_port(1)])
    with pytest.raises(Exception):  # noqa: B017 - WantReadError: waiting for the server
        conn.do_handshake()
    (hello,) = dtls.drain(conn, MTU)
    flow = dtls.flow_bytes(("10.0.0.1", 1), ("10.0.0.2", 2))
    server, replies = dtls.listen(creds["b"].server, hello, flow, MTU)
    assert server is None and len(replies) == 1 and replies[0][0] == 22  # HelloVerifyRequest
    # the client echoes the cookie: accepted for this flow, not for a spoofed one
    conn.bio_write(replies[0])
    with pytest.raises(Exception):  # noqa: B017
        conn.do_handshake()
    (hello2,) = dtls.drain(conn, MTU)
    other = dtls.flow_bytes(("10.0.0.66", 1), ("10.0.0.2", 2))
    assert dtls.listen(creds["b"].server, hello2, other, MTU)[0] is None
    assert dtls.listen(creds["b"].server, hello2, flow, MTU)[0] is not None
    # not DTLS at all: no answer, no state
    assert dtls.listen(creds["b"].server, b"plaintext", flow, MTU) == (None, [])


@in_trio
async def test_datagrams_keep_their_semantics(creds):
    c, s = await handshake(creds)
    messages = [os.urandom(n) for n in (1, 50, 500, c.cleartext_mtu)]
    records = [c.seal(m) for m in messages]
    assert all(len(r) <= MTU for r in records)
    # reordered: delivered in the order received, each whole, no fix-up
    assert [s.open(r) for r in reversed(records)] == [[m] for m in reversed(messages)]
    # replayed: dropped by DTLS
    assert s.open(records[0]) == []
    # lost: later records still open
    later = [c.seal(b"after-%d" % i) for i in range(3)]
    assert s.open(later[2]) == [b"after-2"] and s.open(later[0]) == [b"after-0"]
    # forged: dropped, the association goes on
    forged = bytearray(c.seal(b"x" * 40))
    forged[-1] ^= 1
    assert s.open(bytes(forged)) == []
    assert s.open(c.seal(b"still")) == [b"still"]
    # too big for one record at this MTU: refused, never cut
    with pytest.raises(dtls.TooBig):
        c.seal(b"y" * (c.cleartext_mtu + 1))
    # close_notify ends the association
    with pytest.raises(dtls.PeerClosed):
        s.open(c.close_notify())


@in_trio
async def test_handshake_survives_lost_flights(creds):
    """Drop every other client datagram: OpenSSL's timer resends each lost flight."""
    wire = Wire()
    conn = dtls.new_connection(creds["a"].client, server=False, flow=b"", mtu=MTU)
    conn.set_alpn_protos([dtls.alpn_for_port(9)])
    c = dtls.Association(conn, MTU)
    sends = dropped = 0

    async def lossy_send(datagram: bytes) -> None:
        nonlocal sends, dropped
        sends += 1
        if sends % 2:  # the 1st, 3rd, ... (retransmissions carry new sequence numbers)
            dropped += 1
            return
        await wire.c2s_send.send(datagram)

    async def run_server() -> None:
        flow = b"f"
        while True:
            sconn, replies = dtls.listen(creds["b"].server, await wire.c2s.receive(), flow, MTU)
            if sconn is not None:
                break
            for reply in replies:
                await wire.s2c_send.send(reply)
        await dtls.Association(sconn, MTU).handshake(
            wire.c2s.receive,
            wire.s2c_send.send,
            timeout=20,
            verify=dtls.verifier_for_client(POLICY),
        )

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_server)
            await c.handshake(
                wire.s2c.receive,
                lossy_send,
                timeout=20,
                verify=dtls.verifier_for_server(POLICY, "127.0.0.1"),
            )
    assert dropped >= 3  # ClientHello, ClientHello with cookie, the client's last flight


@in_trio
async def test_handshake_times_out(creds):
    conn = dtls.new_connection(creds["a"].client, server=False, flow=b"", mtu=MTU)
    c = dtls.Association(conn, MTU)
    sent: list[bytes] = []

    async def send(datagram: bytes) -> None:
        sent.append(datagram)

    async def never() -> bytes:
        await trio.sleep_forever()
        raise AssertionError

    with pytest.raises(dtls.HandshakeError, match="timed out after 2.5s"):
        await c.handshake(never, send, timeout=2.5, verify=dtls.verifier_for_server(POLICY, "x"))
    assert len(sent) >= 2  # the ClientHello, then at least one retransmission (1 s timer)
