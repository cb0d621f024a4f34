"""Relay bytes between two half-closeable streams, carrying FIN and RST across.

One call of :func:`relay` is one connection: a nursery that owns both legs
and runs one pump per direction.  The policy is small enough to be a table:

====================================  =========================================
event on one leg                      what the relay does
====================================  =========================================
data                                  ``send_all`` it on the other leg
clean EOF (FIN, or close_notify)      ``send_eof()`` on the other leg; the
                                      opposite direction keeps flowing, for at
                                      most ``half_close_timeout`` seconds
both directions ended cleanly         close both legs gracefully
reset, truncation, TLS alert, any     abort both legs (RST)
error, half-close timeout,
cancellation
====================================  =========================================

Whatever happens, both sockets are closed before :func:`relay` returns or
raises: the closing runs in a ``finally`` shielded from cancellation and
never waits on the network (an abort is ``SO_LINGER {1, 0}`` + ``close``).
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from . import kernel
from .tlsstream import RESET_ERRNOS, ConnectionReset, TLSAlertError, TLSStream, TruncatedError

#: Bytes asked of one leg per read.
CHUNK = 256 * 1024


@dataclass
class RelayResult:
    """What happened to one relayed connection (for its log line)."""

    #: Bytes carried from leg ``a`` to leg ``b`` and back.
    a_to_b: int = 0
    b_to_a: int = 0
    #: ok, reset, truncated, tls-error, timeout, cancelled, error
    outcome: str = "ok"
    #: Which leg failed first and why (empty when ok).
    detail: str = ""


def classify(exc: BaseException) -> str:
    """Name a failure the way the logs and counters do."""
    if isinstance(exc, TruncatedError):
        return "truncated"
    if isinstance(exc, ConnectionReset):
        return "reset"
    if isinstance(exc, TLSAlertError):
        return "tls-error"
    cause = exc.__cause__ or exc.__context__
    for candidate in (exc, cause):
        if isinstance(candidate, OSError) and candidate.errno in RESET_ERRNOS:
            return "reset"
    return "error"


def _reset_behind_eof(stream: trio.abc.Stream) -> bool:
    """A plain TCP leg's EOF that really was a reset (see kernel.was_reset).

    TLS legs need no check: without close_notify an EOF is a truncation anyway.
    """
    sock = getattr(stream, "socket", None)
    return not isinstance(stream, TLSStream) and sock is not None and kernel.was_reset(sock)


async def abort(stream: trio.abc.Stream) -> None:
    """Close ``stream`` so that its peer sees a reset."""
    if isinstance(stream, TLSStream):
        await stream.abort()
        return
    sock = getattr(stream, "socket", None)
    if sock is not None:
        try:
            kernel.set_abort_on_close(sock)
        except OSError:
            pass  # already closed or dead: closing is all that is left
    await stream.aclose()


async def relay(
    a: trio.abc.HalfCloseableStream,
    b: trio.abc.HalfCloseableStream,
    *,
    half_close_timeout: float = 60.0,
) -> RelayResult:
    """Carry bytes both ways until both directions end; close both legs.

    Returns a :class:`RelayResult`; raises only ``trio.Cancelled`` (after
    aborting both legs) when the caller's scope is cancelled.
    """
    result = RelayResult()
    failed: list[tuple[str, BaseException]] = []
    directions_done = 0
    #: Legs we have sent EOF on.
    shut: list[trio.abc.HalfCloseableStream] = []
    graceful = False

    async def pump(
        src: trio.abc.HalfCloseableStream,
        dst: trio.abc.HalfCloseableStream,
        name: str,
        scope: trio.CancelScope,
    ) -> None:
        nonlocal directions_done
        try:
            while True:
                data = await src.receive_some(CHUNK)
                if not data:
                    # Only meaningful while we have not shut src's write side:
                    # after our FIN, the peer's FIN also leaves the socket CLOSE.
                    if src not in shut and _reset_behind_eof(src):
                        raise ConnectionReset("connection reset by peer (seen as EOF)")
                    shut.append(dst)
                    await dst.send_eof()
                    break
                await dst.send_all(data)
                if name == "a->b":
                    result.a_to_b += len(data)
                else:
                    result.b_to_a += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            failed.append((name, exc))
            scope.cancel()
            return
        directions_done += 1
        if directions_done == 1:
            # One way is finished: the other gets a bounded time to finish too.
            scope.deadline = min(scope.deadline, trio.current_time() + half_close_timeout)

    try:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, b, a, "b->a", scope)
                await pump(a, b, "a->b", scope)  # in this task: one task less per connection
        if failed:
            name, exc = failed[0]
            result.outcome = classify(exc)
            result.detail = f"{name}: {exc}"
        elif scope.cancelled_caught:
            result.outcome = "timeout"
            result.detail = f"half-closed for more than {half_close_timeout:g}s"
        else:
            graceful = True
        return result
    except trio.Cancelled:
        result.outcome = "cancelled"
        raise
    finally:
        with trio.CancelScope(shield=True):
            if graceful:
                await a.aclose()
                await b.aclose()
            else:
                await abort(a)
                await abort(b)
