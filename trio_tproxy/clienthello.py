"""What the first bytes of an inbound connection are: a pure parser, no I/O.

A permissive ingress must decide, before consuming anything, whether a
connection is a peer sidecar (a TLS ClientHello offering our ALPN protocol)
or something the app should get untouched (plaintext, or the app's own TLS).
:func:`classify` takes the bytes peeked so far and answers one of:

* :class:`NeedMore` ``(n)``: the answer needs at least ``n`` bytes in total
  (a ClientHello split across TCP segments, or across TLS records);
* ``SIDECAR``: a ClientHello whose ALPN extension lists ``alpn``;
* ``OTHER_TLS``: a TLS handshake record that is not that (no ALPN, other
  protocols, or a ClientHello too large or malformed to read);
* ``PLAINTEXT``: the first byte is not a TLS handshake record.

Invariant (fuzzed in tests/test_clienthello.py): for any bytes, it returns one
of these and never raises; ``NeedMore(n)`` always asks for more than it got,
and never more than :data:`MAX_PEEK`.

The layout read (RFC 8446 4.1.2, RFC 7301): records ``type(1)=22
version(2) length(2) fragment``; the handshake message ``type(1)=1
length(3)`` then ``legacy_version(2) random(32) session_id<0..32>
cipher_suites<2..2^16-2> compression<1..2^8-1> extensions<8..2^16-1>``; ALPN is
extension 16: ``list<2..2^16-1>`` of ``name<1..2^8-1>``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

_HANDSHAKE_RECORD: Final = 22
_CLIENT_HELLO: Final = 1
_ALPN_EXTENSION: Final = 16
_RECORD_HEADER: Final = 5
#: A record fragment is at most 2^14 bytes (RFC 8446 5.1).
_MAX_FRAGMENT: Final = 16384
#: The most we ever peek: a ClientHello larger than this is "other TLS".
#: Ours is about 1.6 KiB with the ML-KEM hybrid key share.
MAX_PEEK: Final = 16384 + _RECORD_HEADER


class Kind(enum.Enum):
    SIDECAR = "sidecar"
    OTHER_TLS = "tls"
    PLAINTEXT = "plaintext"


@dataclass(frozen=True)
class NeedMore:
    """The answer needs at least ``total`` bytes from the start."""

    total: int


SIDECAR: Final = Kind.SIDECAR
OTHER_TLS: Final = Kind.OTHER_TLS
PLAINTEXT: Final = Kind.PLAINTEXT


class _Malformed(Exception):
    pass


def classify(data: bytes, alpn: bytes) -> Kind | NeedMore:
    """See the module docstring."""
    if not data:
        return NeedMore(1)
    if data[0] != _HANDSHAKE_RECORD:
        return PLAINTEXT
    if len(data) < 3:
        return NeedMore(3)
    if data[1] != 3:  # record version 3.x (SSL 3 .. TLS 1.3 all say 3.1..3.3)
        return PLAINTEXT
    # Collect the handshake message from as many records as it spans.
    message = bytearray()
    offset = 0
    while True:
        if len(data) < offset + _RECORD_HEADER:
            return _need(offset + _RECORD_HEADER)
        if data[offset] != _HANDSHAKE_RECORD:
            return OTHER_TLS
        length = int.from_bytes(data[offset + 3 : offset + 5], "big")
        if length == 0 or length > _MAX_FRAGMENT:
            return OTHER_TLS
        end = offset + _RECORD_HEADER + length
        if len(data) < end:
            return _need(end)
        message += data[offset + _RECORD_HEADER : end]
        offset = end
        if len(message) >= 4:
            if message[0] != _CLIENT_HELLO:
                return OTHER_TLS
            wanted = 4 + int.from_bytes(message[1:4], "big")
            if len(message) >= wanted:
                break
            # More records needed; give up early on a size we would never peek.
            if offset + _RECORD_HEADER + (wanted - len(message)) > MAX_PEEK:
                return OTHER_TLS
    try:
        offered = _alpn_protocols(bytes(message[4:wanted]))
    except _Malformed:
        return OTHER_TLS
    return SIDECAR if alpn in offered else OTHER_TLS


def _need(total: int) -> Kind | NeedMore:
    return NeedMore(total) if total <= MAX_PEEK else OTHER_TLS


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise _Malformed
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def number(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def vector(self, length_bytes: int) -> bytes:
        return self.take(self.number(length_bytes))

    @property
    def done(self) -> bool:
        return self.pos == len(self.data)


def _alpn_protocols(body: bytes) -> list[bytes]:
    """The protocols a ClientHello body's ALPN extension lists ([] without one)."""
    r = _Reader(body)
    r.take(2 + 32)  # legacy_version, random
    r.vector(1)  # session id
    r.vector(2)  # cipher suites
    r.vector(1)  # compression methods
    if r.done:
        return []  # no extensions at all (pre-TLS 1.2 style)
    extensions = _Reader(r.vector(2))
    while not extensions.done:
        ext_type = extensions.number(2)
        ext = extensions.vector(2)
        if ext_type != _ALPN_EXTENSION:
            continue
        names = _Reader(_Reader(ext).vector(2))
        protocols = []
        while not names.done:
            name = names.vector(1)
            if not name:
                raise _Malformed
            protocols.append(name)
        return protocols
    return []
