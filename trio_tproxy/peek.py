"""Peek at the first bytes of an accepted connection without consuming them.

Waiting for "more bytes" with MSG_PEEK is the awkward part: the socket stays
readable while any byte is queued, so a plain wait/peek loop would spin.
SO_RCVLOWAT fixes that: with it set to ``n``, poll reports a TCP socket
readable only once ``n`` bytes are queued (or at EOF or an error), so each
round costs one wait and one peek.  The low-water mark is put back to 1
before the socket is handed on.

When the bytes cannot decide (the client sent nothing within the wait: a
server-speaks-first protocol such as SMTP or MySQL; or it half-closed after a
few bytes) the answer is PLAINTEXT: a sidecar always sends its whole
ClientHello at once, so anything slower or shorter is not one.
"""

from __future__ import annotations

import socket

import trio

from .clienthello import PLAINTEXT, Kind, NeedMore, classify


class PeekFailed(Exception):
    """The connection failed (reset) while we waited for its first bytes."""


async def first_bytes_kind(sock: trio.socket.SocketType, alpn: bytes, wait: float) -> Kind:
    """What the connection starts with (see :func:`clienthello.classify`)."""
    need = 1
    data = b""
    try:
        with trio.move_on_after(wait):
            while True:
                # trio tries the peek at once and waits for readability only on EAGAIN.
                data = await sock.recv(need, socket.MSG_PEEK)
                if len(data) < need:
                    # The low-water mark let poll through with fewer bytes: EOF.
                    return PLAINTEXT
                verdict = classify(data, alpn)
                if not isinstance(verdict, NeedMore):
                    return verdict
                need = verdict.total
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, need)
                await trio.lowlevel.wait_readable(sock)
        return PLAINTEXT  # nothing decisive within the wait
    except OSError as exc:
        raise PeekFailed(f"peek failed: {exc}") from None
    finally:
        if need > 1:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
            except OSError:
                pass
