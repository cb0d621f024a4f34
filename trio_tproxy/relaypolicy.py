"""The relay's policy as a table: events in, actions out, no I/O.

A relayed connection has two directions, ``a->b`` and ``b->a``; each is
OPEN, then FORWARDING_EOF (its source said EOF, we are sending EOF on the
other leg), then ENDED.  The connection is RUNNING until the table says how
both legs close (gracefully or with a reset); after that it is DONE and every
later event is ignored: the first verdict stands.

Rows are keyed by the state of the event's own direction, the state of the
other direction and the event (``*``: any state).  A combination the table
lacks is a bug in the adapter (:class:`PolicyError`), never a guess.

==============  ==============  =========  ======================================
this direction  other           event      actions (and the new state)
==============  ==============  =========  ======================================
OPEN            *               data       forward (the same row in every state
                                           a pump runs: see below)
OPEN            *               eof        send_eof on the other leg (this ->
                                           FORWARDING_EOF)
FORWARDING_EOF  OPEN or FWD     eof_sent   arm the half-close timer (this ->
                                           ENDED): the other way gets at most
                                           ``half_close_timeout`` seconds
FORWARDING_EOF  ENDED           eof_sent   close both gracefully, stop (DONE ok)
OPEN or FWD     *               error      abort both (RST), stop (DONE, the
                                           outcome named by the error)
(connection)                    timeout    abort both, stop (DONE timeout)
(connection)                    cancel     abort both, stop (DONE cancelled)
(DONE)                          anything   nothing
==============  ==============  =========  ======================================

"data" is the only event per message.  Its row says *forward* in every state
in which a pump still reads, so the adapter (:func:`trio_tproxy.relay.relay`)
forwards without asking, to keep the per-message path free of calls and
allocations; :func:`step` still answers it and a test checks the two agree.

Errors are classified here too (:func:`classify`), by the exception types of
:mod:`.streams`, so the whole decision "what does this connection's log line
say" is pure.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

import trio

from .streams import RESET_ERRNOS, ConnectionReset, TLSAlertError, TruncatedError


class Dir(enum.IntEnum):
    A_TO_B = 0
    B_TO_A = 1

    @property
    def label(self) -> str:
        return "a->b" if self is Dir.A_TO_B else "b->a"


class Flow(enum.Enum):
    OPEN = "open"
    FORWARDING_EOF = "forwarding-eof"
    ENDED = "ended"


class Event(enum.Enum):
    DATA = "data"
    EOF = "eof"
    EOF_SENT = "eof-sent"
    ERROR = "error"
    TIMEOUT = "timeout"
    CANCEL = "cancel"


class Action(enum.Enum):
    FORWARD = "forward"
    SEND_EOF = "send-eof"
    ARM_TIMER = "arm-timer"
    CLOSE_BOTH = "close-both"
    ABORT_BOTH = "abort-both"
    #: End both pumps now (the verdict is in).
    STOP = "stop"


class PolicyError(Exception):
    """An event the table has no row for: the adapter broke the protocol."""


@dataclass(frozen=True)
class State:
    flows: tuple[Flow, Flow] = (Flow.OPEN, Flow.OPEN)
    #: None while running; then ok, reset, truncated, tls-error, timeout, cancelled, error.
    outcome: str | None = None

    @property
    def done(self) -> bool:
        return self.outcome is not None


_ANY = None
_RUNNING = (Flow.OPEN, Flow.FORWARDING_EOF)
#: (this flow, other flow or _ANY, event) -> (this flow afterwards, actions, outcome or None)
Row = tuple[Flow, tuple[Action, ...], str | None]  # noqa: UP040 - a plain alias
TABLE: dict[tuple[Flow, Flow | None, Event], Row] = {
    (Flow.OPEN, _ANY, Event.DATA): (Flow.OPEN, (Action.FORWARD,), None),
    (Flow.OPEN, _ANY, Event.EOF): (Flow.FORWARDING_EOF, (Action.SEND_EOF,), None),
    (Flow.FORWARDING_EOF, Flow.OPEN, Event.EOF_SENT): (Flow.ENDED, (Action.ARM_TIMER,), None),
    (Flow.FORWARDING_EOF, Flow.FORWARDING_EOF, Event.EOF_SENT): (
        Flow.ENDED,
        (Action.ARM_TIMER,),
        None,
    ),
    (Flow.FORWARDING_EOF, Flow.ENDED, Event.EOF_SENT): (
        Flow.ENDED,
        (Action.CLOSE_BOTH, Action.STOP),
        "ok",
    ),
    **{
        (flow, _ANY, Event.ERROR): (flow, (Action.ABORT_BOTH, Action.STOP), "error")
        for flow in _RUNNING
    },
}
#: Events of the whole connection (no direction).
CONNECTION_EVENTS: dict[Event, tuple[tuple[Action, ...], str]] = {
    Event.TIMEOUT: ((Action.ABORT_BOTH, Action.STOP), "timeout"),
    Event.CANCEL: ((Action.ABORT_BOTH, Action.STOP), "cancelled"),
}


def step(
    state: State, event: Event, direction: Dir | None = None, *, outcome: str | None = None
) -> tuple[State, tuple[Action, ...]]:
    """One transition.  ``outcome`` names an ERROR (see :func:`classify`)."""
    if state.done:
        return state, ()
    if direction is None:
        if event not in CONNECTION_EVENTS:
            raise PolicyError(f"{event.value} needs a direction")
        conn_actions, conn_verdict = CONNECTION_EVENTS[event]
        return replace(state, outcome=conn_verdict), conn_actions
    this, other = state.flows[direction], state.flows[1 - direction]
    row = TABLE.get((this, other, event)) or TABLE.get((this, _ANY, event))
    if row is None:
        raise PolicyError(f"{event.value} on {direction.label} while it is {this.value}")
    flow, actions, verdict = row
    if verdict == "error" and outcome is not None:
        verdict = outcome  # the classified error
    flows = (flow, other) if direction is Dir.A_TO_B else (other, flow)
    return State(flows, verdict), actions


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


#: What a pump may raise that means "this leg failed" (anything else is a bug).
LEG_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
