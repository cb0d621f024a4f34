"""The relay policy table, driven directly: no sockets, no trio."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_tproxy.relaypolicy import (
    TABLE,
    Action,
    Dir,
    Event,
    Flow,
    PolicyError,
    State,
    classify,
    step,
)
from trio_tproxy.streams import ConnectionReset, TLSAlertError, TruncatedError

A, B = Dir.A_TO_B, Dir.B_TO_A


def run(*events: tuple[Event, Dir | None]) -> tuple[State, list[tuple[Action, ...]]]:
    state, out = State(), []
    for event, direction in events:
        state, actions = step(state, event, direction)
        out.append(actions)
    return state, out


def test_both_directions_ending_cleanly_closes_both_gracefully():
    state, out = run((Event.DATA, A), (Event.EOF, A), (Event.EOF_SENT, A), (Event.DATA, B))
    assert out == [(Action.FORWARD,), (Action.SEND_EOF,), (Action.ARM_TIMER,), (Action.FORWARD,)]
    assert state.flows == (Flow.ENDED, Flow.OPEN) and not state.done
    state, actions = step(state, Event.EOF, B)
    assert actions == (Action.SEND_EOF,)
    state, actions = step(state, Event.EOF_SENT, B)
    assert actions == (Action.CLOSE_BOTH, Action.STOP)
    assert state.outcome == "ok"


def test_eof_sent_on_both_concurrently_arms_then_closes():
    state, out = run((Event.EOF, A), (Event.EOF, B), (Event.EOF_SENT, B), (Event.EOF_SENT, A))
    assert out[2] == (Action.ARM_TIMER,)
    assert out[3] == (Action.CLOSE_BOTH, Action.STOP)
    assert state.outcome == "ok"


@pytest.mark.parametrize(
    "prefix",
    [(), ((Event.EOF, A),), ((Event.EOF, A), (Event.EOF_SENT, A))],
    ids=["open", "forwarding-eof", "half-closed"],
)
def test_an_error_aborts_both_whatever_the_state(prefix):
    state, _ = run(*prefix)
    direction = B if prefix and prefix[-1][0] is Event.EOF_SENT else A
    state, actions = step(state, Event.ERROR, direction, outcome="reset")
    assert actions == (Action.ABORT_BOTH, Action.STOP)
    assert state.outcome == "reset"


@pytest.mark.parametrize("event,outcome", [(Event.TIMEOUT, "timeout"), (Event.CANCEL, "cancelled")])
def test_timeout_and_cancel_abort_both(event, outcome):
    state, _ = run((Event.EOF, A), (Event.EOF_SENT, A))
    state, actions = step(state, event)
    assert actions == (Action.ABORT_BOTH, Action.STOP)
    assert state.outcome == outcome


def test_the_first_verdict_stands():
    state, _ = run((Event.ERROR, A))
    assert state.outcome == "error"
    for event, direction in [(Event.CANCEL, None), (Event.EOF_SENT, B), (Event.DATA, A)]:
        assert step(state, event, direction) == (state, ())


@pytest.mark.parametrize(
    "prefix,event,direction",
    [
        ((), Event.EOF_SENT, A),  # EOF forwarded that was never seen
        (((Event.EOF, A),), Event.DATA, A),  # data after EOF on the same direction
        (((Event.EOF, A),), Event.EOF, A),  # EOF twice
        (((Event.EOF, A), (Event.EOF_SENT, A)), Event.ERROR, A),  # the pump ended
        ((), Event.DATA, None),  # data needs a direction
    ],
)
def test_a_missing_row_is_a_policy_error(prefix, event, direction):
    state, _ = run(*prefix)
    with pytest.raises(PolicyError):
        step(state, event, direction)


def test_data_is_forward_in_every_state_a_pump_reads():
    """The adapter forwards data without asking the table: the table must agree."""
    for (this, _other, event), (flow, actions, verdict) in TABLE.items():
        if event is Event.DATA:
            assert (flow, actions, verdict) == (this, (Action.FORWARD,), None)
    for other in Flow:
        state = State((Flow.OPEN, other))
        assert step(state, Event.DATA, A)[1] == (Action.FORWARD,)


def test_classify_names_outcomes_by_type():
    assert classify(TruncatedError("x")) == "truncated"
    assert classify(ConnectionReset("x")) == "reset"
    assert classify(TLSAlertError("x")) == "tls-error"
    assert classify(BrokenPipeError(32, "EPIPE")) == "reset"
    assert classify(RuntimeError("?")) == "error"


# --- the property ------------------------------------------------------------------------


#: What the pumps of a running relay can report next, given the state.
def legal_events(state: State, armed: bool) -> list[tuple[Event, Dir | None]]:
    events: list[tuple[Event, Dir | None]] = [(Event.CANCEL, None)]
    if armed:
        events.append((Event.TIMEOUT, None))
    for d in Dir:
        flow = state.flows[d]
        if flow is Flow.OPEN:
            events += [(Event.DATA, d), (Event.EOF, d), (Event.ERROR, d)]
        elif flow is Flow.FORWARDING_EOF:
            events += [(Event.EOF_SENT, d), (Event.ERROR, d)]
    return events


@given(st.lists(st.integers(0, 1000), min_size=1, max_size=40))
def test_property_every_run_ends_with_exactly_one_close_of_both_legs(choices):
    """Whatever the pumps report, in whatever order: each leg gets EOF at most once,
    the legs are closed exactly once (gracefully only if both directions ended
    cleanly), the timer is armed only after one direction ended, nothing follows
    the verdict."""
    state, armed = State(), False
    eof_sent: list[Dir] = []
    closes: list[Action] = []
    for choice in choices:
        if state.done:
            break
        options = legal_events(state, armed)
        event, direction = options[choice % len(options)]
        before = state
        state, actions = step(state, event, direction)
        if Action.SEND_EOF in actions:
            assert direction is not None and direction not in eof_sent
            eof_sent.append(direction)
        if Action.ARM_TIMER in actions:
            assert Flow.ENDED in state.flows
            armed = True
        closes += [a for a in actions if a in (Action.CLOSE_BOTH, Action.ABORT_BOTH)]
        if Action.CLOSE_BOTH in actions:
            assert state.flows == (Flow.ENDED, Flow.ENDED) and state.outcome == "ok"
        if closes:
            assert state.done and Action.STOP in actions
        else:
            assert not state.done, (before, event, direction)
    assert len(closes) <= 1
    if not state.done:
        state, actions = step(state, Event.CANCEL)
        closes += [a for a in actions if a in (Action.CLOSE_BOTH, Action.ABORT_BOTH)]
    assert len(closes) == 1 and state.done
    assert step(state, Event.CANCEL) == (state, ())
