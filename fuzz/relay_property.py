"""The half-close / reset property of a relayed connection, as a hypothesis test.

Invariant, in one sentence: *each end receives exactly (a prefix, if anyone
aborted) the bytes the other sent, sees EOF exactly when the other half-closed,
sees a reset when the other aborted, and every relay leg is closed soon after.*

A script is a list of actions drawn by hypothesis (which shrinks a failing
one to a minimal script): send k bytes from either end, half-close from either
end, abort from either end, pause.  The script runs against any *transport*:
an async factory giving two connected app ends.  ``tests/test_fuzz.py`` uses
the loopback relay chain (``lab.chain.loopback_transport``); the netns suite
uses the real kernel path (``lab.pods.Pods``: app A -> sidecar A -> sidecar B
-> app B).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import trio
from hypothesis import strategies as st

from lab.chain import Transport, abort_socket_stream

END = ("client", "server")

#: (kind, end, amount): kind in send/eof/abort/pause.
Action = tuple[str, str, int]

actions = st.one_of(
    st.tuples(
        st.just("send"),
        st.sampled_from(END),
        st.one_of(st.integers(0, 64), st.integers(0, 300_000)),
    ),
    st.tuples(st.just("eof"), st.sampled_from(END), st.just(0)),
    st.tuples(st.just("abort"), st.sampled_from(END), st.just(0)),
    st.tuples(st.just("pause"), st.just("-"), st.integers(0, 30)),
)
scripts = st.lists(actions, min_size=1, max_size=12)

# A transport (lab.chain.Transport): ``async with transport() as (client, server): ...``;
# on exit it checks that everything it set up for the connection was closed.
# lab.chain.loopback_transport and lab.pods.Pods.transport are the two.


@dataclass
class End:
    name: str
    stream: trio.SocketStream
    sent: bytearray = field(default_factory=bytearray)
    received: bytearray = field(default_factory=bytearray)
    eof_sent: bool = False
    aborted: bool = False
    #: How the read side ended: None (still open), "eof", "reset".
    read_end: str | None = None
    done: trio.Event = field(default_factory=trio.Event)

    async def reader(self) -> None:
        try:
            while data := await self.stream.receive_some(1 << 18):
                self.received += data
            self.read_end = "eof"
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.read_end = "closed" if isinstance(exc, trio.ClosedResourceError) else "reset"
        finally:
            self.done.set()


async def run_script(script: list[Action], transport: Transport, *, bound: float = 10.0) -> None:
    """Run one script; raise AssertionError with the reason if the property fails."""
    async with transport() as (client_stream, server_stream):
        ends = {"client": End("client", client_stream), "server": End("server", server_stream)}
        other = {"client": ends["server"], "server": ends["client"]}
        async with trio.open_nursery() as nursery:
            for end in ends.values():
                nursery.start_soon(end.reader)
            aborted_by: str | None = None
            for kind, who, amount in script:
                if kind == "pause":
                    await trio.sleep(amount / 1000)
                    continue
                end = ends[who]
                if end.aborted or aborted_by is not None and kind != "abort":
                    continue  # nothing sensible to do on a dead connection
                if kind == "send" and not end.eof_sent:
                    payload = os.urandom(amount)
                    try:
                        await end.stream.send_all(payload)
                    except trio.BrokenResourceError:
                        # Only legal once the other end has aborted.
                        assert aborted_by is not None, f"{who}: send failed with no abort"
                        continue
                    end.sent += payload
                elif kind == "eof" and not end.eof_sent:
                    await end.stream.send_eof()
                    end.eof_sent = True
                elif kind == "abort":
                    await abort_socket_stream(end.stream)
                    end.aborted = True
                    aborted_by = aborted_by or who

            with trio.fail_after(bound):
                if aborted_by is None:
                    await _finish_cleanly(ends, other)
                else:
                    await _finish_after_abort(ends, other, aborted_by)
            nursery.cancel_scope.cancel()
        for end in ends.values():
            if not end.aborted:
                await end.stream.aclose()


async def _finish_cleanly(ends: dict[str, End], other: dict[str, End]) -> None:
    # Everything sent must arrive; EOF only where the other end half-closed.
    for name, end in ends.items():
        sender = other[name]
        while len(end.received) < len(sender.sent) and not end.done.is_set():  # noqa: ASYNC110 - polls a byte count
            await trio.sleep(0.005)
        assert bytes(end.received) == bytes(sender.sent), (
            f"{name} received {len(end.received)} bytes, "
            f"{sender.name} sent {len(sender.sent)} (or the bytes differ)"
        )
        if sender.eof_sent:
            await end.done.wait()
            assert end.read_end == "eof", f"{name} saw {end.read_end}, expected eof"
    await trio.sleep(0.05)
    for name, end in ends.items():
        if not other[name].eof_sent:
            assert end.read_end is None, f"{name} saw {end.read_end} but nobody half-closed"
    # Now close the rest cleanly: the relays must end "ok" (the transport checks).
    for end in ends.values():
        if not end.eof_sent:
            await end.stream.send_eof()
            end.eof_sent = True
    for name, end in ends.items():
        await end.done.wait()
        assert end.read_end == "eof", f"{name} saw {end.read_end} at the final close"
        assert bytes(end.received) == bytes(other[name].sent)


async def _finish_after_abort(ends: dict[str, End], other: dict[str, End], aborter: str) -> None:
    victim = other[aborter]
    await victim.done.wait()
    sender = ends[aborter]
    assert bytes(victim.received) == bytes(sender.sent[: len(victim.received)]), (
        f"{victim.name} received bytes that {aborter} never sent"
    )
    if victim.aborted:
        return  # it aborted too, maybe before the reset reached it: nothing more to see
    if sender.eof_sent and len(victim.received) == len(sender.sent):
        # The EOF may have been delivered before the abort; a reset is fine too.
        assert victim.read_end in ("eof", "reset"), victim.read_end
    else:
        assert victim.read_end == "reset", (
            f"{victim.name} saw {victim.read_end} after {aborter} aborted; expected reset"
        )
    if victim.read_end == "eof" and not victim.eof_sent:
        # Its connection must still be dead for writing: a send fails soon.
        with trio.fail_after(5):
            while True:
                try:
                    await victim.stream.send_all(b"?")
                except trio.BrokenResourceError:
                    break
                await trio.sleep(0.02)


async def no_tasks_left() -> AsyncIterator[None]:  # pragma: no cover - helper for callers
    yield
