"""Inactivity limits of every relayed connection, watched by one task.

A relay is reset after ``limit`` seconds without a byte forwarded either way
(see :mod:`.relay`).  The per-message path pays nothing for it: the relay
already counts what it forwards, and this module's one task per trio run, the
sweeper, compares each connection's count with what it saw last, at least
every quarter of that connection's limit.  So a connection is reset between
1 and 1.25 times its limit after its last forwarded chunk.

One task for all connections, not one per connection: a connection costs a
small :class:`Watch` in a set, not a task, its cancel scopes and a timer in
trio's deadline heap (which would outlive the connection by up to a quarter
of its limit).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import trio

#: Looks per limit.
CHECKS = 4


class Watch:
    """One connection's inactivity limit (see :func:`watch`)."""

    __slots__ = ("progress", "scope", "limit", "seen", "quiet_since", "due", "expired")

    def __init__(self, progress: Callable[[], int], scope: trio.CancelScope, limit: float) -> None:
        #: Bytes forwarded so far, both ways.
        self.progress = progress
        #: Cancelled when the limit passes.
        self.scope = scope
        self.limit = limit
        self.seen = -1
        self.quiet_since = trio.current_time()
        #: When the sweeper looks next.
        self.due = self.quiet_since + limit / CHECKS
        #: The limit passed (the scope was cancelled for it).
        self.expired = False

    def shorten(self, limit: float) -> None:
        """A shorter limit from now on, counted from now (an EOF is activity too)."""
        if limit < self.limit:
            self.limit = limit
            self.quiet_since = trio.current_time()
            self.due = min(self.due, self.quiet_since + limit / CHECKS)
            _sweeper().wake_by(self.due)


class _Sweeper:
    def __init__(self) -> None:
        self.watches: set[Watch] = set()
        self.nap = trio.CancelScope()

    def wake_by(self, when: float) -> None:
        self.nap.deadline = min(self.nap.deadline, when)

    async def run(self) -> None:
        while True:
            now = trio.current_time()
            next_due = math.inf
            for w in list(self.watches):
                if w.due <= now:
                    moved = w.progress()
                    if moved != w.seen:
                        w.seen, w.quiet_since = moved, now
                    elif now - w.quiet_since >= w.limit - w.limit / (2 * CHECKS):
                        w.expired = True
                        w.scope.cancel()
                        self.watches.discard(w)
                        continue
                    w.due = now + w.limit / CHECKS
                next_due = min(next_due, w.due)
            self.nap = trio.CancelScope(deadline=next_due)
            with self.nap:
                await trio.sleep_forever()


_SWEEPER: trio.lowlevel.RunVar[_Sweeper] = trio.lowlevel.RunVar("inactivity_sweeper")


def _sweeper() -> _Sweeper:
    try:
        return _SWEEPER.get()
    except LookupError:
        sweeper = _Sweeper()
        _SWEEPER.set(sweeper)
        trio.lowlevel.spawn_system_task(sweeper.run, name="inactivity sweeper")
        return sweeper


def watch(progress: Callable[[], int], scope: trio.CancelScope, limit: float) -> Watch:
    """Cancel ``scope`` once ``progress()`` has not moved for about ``limit`` seconds."""
    w = Watch(progress, scope, limit)
    sweeper = _sweeper()
    sweeper.watches.add(w)
    sweeper.wake_by(w.due)
    return w


def unwatch(w: Watch) -> None:
    """The connection is over: forget it."""
    _sweeper().watches.discard(w)
