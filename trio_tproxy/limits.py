"""Bounded resources: admission at accept, one warning per kind, fds and memory.

Admission
---------
Every accepted socket is admitted or refused *in the accept loop*, before a
task, a TLS object or a byte read exists for it: a refusal is an RST
(``SO_LINGER {1, 0}`` + ``close``), so a flood costs the sidecar one
``accept`` and one ``close`` per connection.  Three counters, kept by
:class:`Admission`:

* ``active``: every connection held, both directions, from accept until its
  handler ends (``--max-connections``);
* ``pending``: inbound connections not yet past the TLS handshake and the
  identity check, i.e. not authenticated (``--max-pending-handshakes``), and
  the same per source address (``--max-pending-per-source``), so that one
  flooder fills its own quota and nobody else's.  Egress connections come from
  the pod's own app: only the global cap applies to them.

The defaults (see :class:`~trio_tproxy.config.Limits`), for a pod with a
256 MiB memory limit: an idle relayed connection costs 55-60 KB and a
pending handshake 58 KB (measured in the two-pod lab: TLS state, two sockets,
the tasks) and the sidecar itself ~43 MB (55 MB before it left pyroute2), so
2048 connections stay near 165 MB with room for the buffers of those moving
data (up to 256 KiB each while a chunk is in flight); 512 pending handshakes are ~30 MB, far more
than a fleet reconnecting at once has in
flight (a handshake takes a few milliseconds); 64 per source leaves a busy
client pod room for a cold connection pool while one address cannot hold
more than an eighth of the pending budget.

Over a limit the sidecar says so in one warning line per kind per
:data:`WARN_EVERY` seconds (with the number refused since the last line)
and counts every refusal in ``Stats.refusals``; nothing is ever a traceback.

Also here: raising the soft ``RLIMIT_NOFILE`` to the hard limit at start,
and giving freed heap back to the kernel after a burst.  glibc keeps what
a flood freed: measured with 5,000 pending handshakes (58 KB each), B's RSS
went 55 -> 345 MB and stayed at 348 MB after they closed; ``malloc_trim(0)``
brought it to 94 MB.  So every :data:`TRIM_EVERY` seconds the sidecar looks
whether at least :data:`TRIM_AFTER` connections were let go since the last
look (``Admission.burst_ended``), and trims if so: nothing per connection.
"""

from __future__ import annotations

import logging
import resource
from collections import Counter
from dataclasses import dataclass, field

from .config import Limits

log = logging.getLogger("trio_tproxy")

#: Seconds between two warning lines of the same kind.
WARN_EVERY = 10.0
#: Kinds of refusal (the counter's label and the flag to raise).
MAX_CONNECTIONS = "max-connections"
MAX_PENDING = "max-pending-handshakes"
MAX_PENDING_PER_SOURCE = "max-pending-per-source"


@dataclass
class Admission:
    """The counters behind the limits; pure (no I/O), driven by the proxy."""

    limits: Limits
    active: int = 0
    pending: int = 0
    pending_by_source: Counter[str] = field(default_factory=Counter)
    #: Highest ``active`` since :meth:`burst_ended` last looked.
    peak: int = 0

    def admit(self, source: str, *, pending: bool) -> str | None:
        """Take a slot, or say which limit refuses it (the kind, for the counter)."""
        limits = self.limits
        if self.active >= limits.max_connections:
            return MAX_CONNECTIONS
        if pending:
            if self.pending >= limits.max_pending_handshakes:
                return MAX_PENDING
            if self.pending_by_source[source] >= limits.max_pending_per_source:
                return MAX_PENDING_PER_SOURCE
            self.pending += 1
            self.pending_by_source[source] += 1
        self.active += 1
        if self.active > self.peak:
            self.peak = self.active
        return None

    def authenticated(self, source: str) -> None:
        """A pending connection's handshake is over (whatever its result)."""
        self.pending -= 1
        left = self.pending_by_source[source] - 1
        if left:
            self.pending_by_source[source] = left
        else:
            del self.pending_by_source[source]  # the Counter must not grow with sources

    def closed(self) -> None:
        self.active -= 1

    def burst_ended(self) -> bool:
        """Whether at least TRIM_AFTER connections were let go since the last look."""
        ended = self.peak - self.active >= TRIM_AFTER
        self.peak = self.active
        return ended


class Throttle:
    """One log line per kind per ``every`` seconds; counts what it kept quiet."""

    def __init__(self, every: float = WARN_EVERY) -> None:
        self.every = every
        self._last: dict[str, float] = {}
        self._quiet: Counter[str] = Counter()

    def due(self, kind: str, now: float) -> int | None:
        """None: stay quiet.  Otherwise log now; the number kept quiet since the last line."""
        last = self._last.get(kind)
        if last is not None and now - last < self.every:
            self._quiet[kind] += 1
            return None
        self._last[kind] = now
        return self._quiet.pop(kind, 0)


def raise_fd_limit() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit; returns (soft, hard).

    Quiet on success (the "ready:" line says the value: a start-up failure
    stays one line); one warning if the kernel refuses."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, exc)
            return soft, hard
    return soft, hard


#: Connections let go within one look that earn a trim (~14 MB of heap at ~55 KB each).
TRIM_AFTER = 256
#: Seconds between two looks (a trim walks the heap: milliseconds).
TRIM_EVERY = 10.0
