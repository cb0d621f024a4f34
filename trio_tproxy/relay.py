"""Relay bytes between two relay streams: the thin I/O adapter of :mod:`.relaypolicy`.

One call of :func:`relay` is one connection: a nursery that owns both legs and
runs one pump per direction (one of them in the caller's task: one task less
per connection).  A pump reads its source leg and writes the other; every
event other than data (EOF, EOF forwarded, an error, inactivity,
cancellation) goes through :func:`.relaypolicy.step`, and the adapter carries
out the actions it returns: ``send_eof`` on the other leg, arming the
half-close timer, stopping both pumps, and closing both legs gracefully or
with a reset.

Inactivity, not deadlines: a connection is reset after ``idle_timeout``
seconds without a byte forwarded either way, and, once one direction has
ended ("arm the half-close timer"), after ``half_close_timeout`` seconds
without one (a server may stream its answer long after the client's FIN).
The per-message path pays nothing for it: the pumps already count the bytes
they forward (the relay thread too, see :mod:`.fastpath`), and one task for
all connections (:mod:`.inactivity`) compares each count with what it saw
last, at least every quarter of the limit.  So a connection is reset between
1 and 1.25 times the limit after its last forwarded chunk (a chunk is counted
once written whole, up to 256 KiB).  Arming the half-close timer only brings
the next look forward.

:func:`relay` is the only owner of closing both legs: whatever happens, both
are closed before it returns or raises.  The closing runs in a ``finally``
shielded from cancellation and never waits on the network (an abort is
``SO_LINGER {1, 0}`` + ``close``); without a verdict (a bug) it aborts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import trio

from . import fastpath, inactivity
from .relaypolicy import LEG_ERRORS, Action, Dir, Event, State, classify, step
from .streams import Stream

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


async def relay(
    a: Stream,
    b: Stream,
    *,
    half_close_timeout: float = 60.0,
    idle_timeout: float = math.inf,
    result: RelayResult | None = None,
) -> RelayResult:
    """Carry bytes both ways until both directions end; close both legs.

    Returns ``result`` (a new :class:`RelayResult` if None), filled in; raises
    only ``trio.Cancelled`` (after aborting both legs, with ``result.outcome``
    "cancelled") when the caller's scope is cancelled.
    """
    if result is None:
        result = RelayResult()
    out = result
    state = State()
    closing = Action.ABORT_BOTH
    #: The inactivity limit (idle_timeout, then the half-close one once armed).
    watch: inactivity.Watch | None = None

    def apply(event: Event, direction: Dir | None, scope: trio.CancelScope, **kw: str) -> bool:
        """Step the table; carry out what needs no await.  True: send EOF now."""
        nonlocal state, closing
        state, actions = step(state, event, direction, **kw)
        for action in actions:
            if action is Action.ARM_TIMER:
                if watch is not None:
                    watch.shorten(half_close_timeout)
            elif action is Action.STOP:
                scope.cancel()
            elif action is Action.CLOSE_BOTH or action is Action.ABORT_BOTH:
                closing = action
        return Action.SEND_EOF in actions

    #: The compiled data path for these legs (None: the Python loop alone).
    fast = fastpath.pair(a, b)

    def count_a_to_b(n: int) -> None:
        out.a_to_b += n

    def count_b_to_a(n: int) -> None:
        out.b_to_a += n

    def progress() -> int:
        return out.a_to_b + out.b_to_a + (fast.in_flight() if fast is not None else 0)

    async def pump(src: Stream, dst: Stream, d: Dir, scope: trio.CancelScope) -> None:
        try:
            # The compiled path carries the data while there is data (the
            # table's DATA rows); the loops below then meet the source's end.
            if d is Dir.A_TO_B:
                if fast is not None:
                    await fast.forward(src is fast.plain, count_a_to_b)
                while data := await src.receive_some(CHUNK):
                    await dst.send_all(data)  # the table's DATA row: forward
                    out.a_to_b += len(data)
            else:
                if fast is not None:
                    await fast.forward(src is fast.plain, count_b_to_a)
                while data := await src.receive_some(CHUNK):
                    await dst.send_all(data)
                    out.b_to_a += len(data)
            if apply(Event.EOF, d, scope):
                await dst.send_eof()
            apply(Event.EOF_SENT, d, scope)
        except LEG_ERRORS as exc:
            if not state.done:
                out.detail = f"{d.label}: {exc}"
            apply(Event.ERROR, d, scope, outcome=classify(exc))

    try:
        with trio.CancelScope() as scope:
            if idle_timeout != math.inf or half_close_timeout != math.inf:
                watch = inactivity.watch(progress, scope, idle_timeout)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, b, a, Dir.B_TO_A, scope)
                await pump(a, b, Dir.A_TO_B, scope)
        if not state.done and watch is not None and watch.expired:
            apply(Event.TIMEOUT, None, scope)
            limit = watch.limit
            if limit == half_close_timeout and limit < idle_timeout:
                out.detail = f"half-closed and idle for more than {limit:g}s"
            else:
                out.detail = f"idle for more than {limit:g}s"
        return out
    finally:
        if watch is not None:
            inactivity.unwatch(watch)
        if not state.done and trio.current_effective_deadline() == -math.inf:
            # Cancelled from outside (it may arrive as a group of Cancelled).
            apply(Event.CANCEL, None, scope)
        # No verdict at all: a bug escaped a pump; abort (closing's default).
        out.outcome = state.outcome or "error"
        if fast is not None:
            fast.stop()  # the relay thread lets go of the fds before they close
            to_tls, to_plain = fast.unreported()  # what it carried before a cancel
            out.a_to_b += to_tls if fast.plain is a else to_plain
            out.b_to_a += to_plain if fast.plain is a else to_tls
        with trio.CancelScope(shield=True):
            if closing is Action.CLOSE_BOTH:
                await a.aclose()
                await b.aclose()
            else:
                await a.abort()
                await b.abort()
        if fast is not None:
            fast.release()
