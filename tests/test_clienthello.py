"""clienthello.classify: real ClientHellos (ours, the stdlib's), every split, fuzz.

Invariant (fuzzed): for any bytes, classify returns SIDECAR, OTHER_TLS,
PLAINTEXT or NeedMore(n) with len(data) < n <= MAX_PEEK, and never raises.
"""

from __future__ import annotations

import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from OpenSSL import SSL

from trio_tproxy.clienthello import MAX_PEEK, OTHER_TLS, PLAINTEXT, SIDECAR, NeedMore, classify
from trio_tproxy.tlspolicy import ALPN


def openssl_hello(alpn: list[bytes] | None) -> bytes:
    ctx = SSL.Context(SSL.TLS_METHOD)
    if alpn is not None:
        ctx.set_alpn_protos(alpn)
    conn = SSL.Connection(ctx, None)
    conn.set_connect_state()
    with pytest.raises(SSL.WantReadError):
        conn.do_handshake()
    return conn.bio_read(65536)


def stdlib_hello(alpn: list[str]) -> bytes:
    ctx = ssl.create_default_context()
    ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="app.example")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def refragment(hello: bytes, size: int) -> bytes:
    """The same handshake message carried in records of at most ``size`` bytes."""
    body = hello[5:]
    out = b""
    for i in range(0, len(body), size):
        chunk = body[i : i + size]
        out += hello[:3] + len(chunk).to_bytes(2, "big") + chunk
    return out


def test_our_hello_is_a_sidecar_and_others_are_not():
    assert classify(openssl_hello([ALPN]), ALPN) is SIDECAR
    assert classify(openssl_hello([b"h2", ALPN]), ALPN) is SIDECAR
    assert classify(openssl_hello(None), ALPN) is OTHER_TLS
    assert classify(openssl_hello([b"h2", b"http/1.1"]), ALPN) is OTHER_TLS
    assert classify(stdlib_hello(["h2", "http/1.1"]), ALPN) is OTHER_TLS
    # A prefix of our name is not our name.
    assert classify(openssl_hello([ALPN[:-1]]), ALPN) is OTHER_TLS


def test_plaintext_is_decided_on_the_first_byte():
    assert classify(b"G", ALPN) is PLAINTEXT
    assert classify(b"GET / HTTP/1.1\r\n", ALPN) is PLAINTEXT
    assert classify(b"\x16\x01", ALPN) == NeedMore(3)
    assert classify(b"\x16\x01\x00", ALPN) is PLAINTEXT  # not record version 3.x
    assert classify(b"", ALPN) == NeedMore(1)


def test_every_split_of_our_hello_asks_for_more_until_complete():
    hello = openssl_hello([ALPN])
    for cut in range(len(hello)):
        verdict = classify(hello[:cut], ALPN)
        assert isinstance(verdict, NeedMore), (cut, verdict)
        assert cut < verdict.total <= len(hello)
    assert classify(hello + b"trailing app data", ALPN) is SIDECAR


@pytest.mark.parametrize("size", [1, 3, 4, 100, 512])
def test_a_hello_split_across_records_is_reassembled(size):
    hello = refragment(openssl_hello([ALPN]), size)
    assert classify(hello, ALPN) is SIDECAR
    verdict = classify(hello[: len(hello) // 2], ALPN)
    assert isinstance(verdict, NeedMore)


def test_a_non_handshake_record_is_other_tls():
    assert classify(b"\x17\x03\x03\x00\x05hello", ALPN) is PLAINTEXT
    assert classify(b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", ALPN) is OTHER_TLS  # ServerHello
    assert classify(b"\x16\x03\x01\x00\x00", ALPN) is OTHER_TLS  # empty record


def test_an_oversized_hello_is_other_tls_without_peeking_forever():
    # A full first record of a ClientHello that claims 70000 bytes: never wait for them.
    record = b"\x01" + (70000).to_bytes(3, "big") + bytes(16380)
    assert classify(b"\x16\x03\x01\x40\x00" + record, ALPN) is OTHER_TLS


def check_invariant(data: bytes) -> None:
    verdict = classify(data, ALPN)
    if isinstance(verdict, NeedMore):
        assert len(data) < verdict.total <= MAX_PEEK
    else:
        assert verdict in (SIDECAR, OTHER_TLS, PLAINTEXT)


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_any_bytes(data):
    check_invariant(data)


HELLO = openssl_hello([ALPN])


@settings(max_examples=3000, deadline=None)
@given(st.integers(0, len(HELLO) - 1), st.integers(0, 255), st.integers(0, len(HELLO)))
def test_fuzz_mutated_hello(position, value, cut):
    mutated = bytearray(HELLO)
    mutated[position] = value
    check_invariant(bytes(mutated[:cut]))
    check_invariant(bytes(mutated))
