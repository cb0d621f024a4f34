"""Warn ahead of our own certificate's expiry: one line now and then, never a flood.

Once less than :data:`WARN_FRACTION` of the certificate's lifetime is left
(9 days of a 90-day certificate, 6 minutes of a 1-hour SPIFFE SVID), the
sidecar logs one warning, then one each time half of what was left at the
previous line has gone (closer together as expiry nears: about 20 lines over
the last 9 days of a 90-day certificate), and one error when it has expired (peers then refuse every full
handshake).  The schedule is the pure :func:`next_warning`; :func:`watch`
sleeps on it, reading the credentials through a callable so that a reload
(which replaces them) restarts the schedule.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable

import trio

from .credentials import Credentials

log = logging.getLogger("trio_tproxy")

#: Warn once less than this fraction of the lifetime is left.
WARN_FRACTION = 0.1
#: Never two lines closer than this (seconds).
MIN_GAP = 1.0


def warning_text(not_before: dt.datetime, not_after: dt.datetime, now: dt.datetime) -> str | None:
    """The line to log now, or None while more than WARN_FRACTION of the lifetime is left."""
    left = (not_after - now).total_seconds()
    lifetime = (not_after - not_before).total_seconds()
    if left <= 0:
        return (
            f"our certificate expired on {not_after:%Y-%m-%d %H:%M:%S} UTC: peers refuse "
            "every new connection until it is renewed"
        )
    if left > WARN_FRACTION * lifetime:
        return None
    return (
        f"our certificate expires in {_duration(left)} (on {not_after:%Y-%m-%d %H:%M:%S} UTC, "
        f"{left / lifetime:.0%} of its lifetime left): renew it"
    )


def next_warning(not_before: dt.datetime, not_after: dt.datetime, now: dt.datetime) -> float:
    """Seconds from ``now`` until the next line is due (inf after the expiry line)."""
    left = (not_after - now).total_seconds()
    lifetime = (not_after - not_before).total_seconds()
    if left <= 0:
        return float("inf")
    window = WARN_FRACTION * lifetime
    if left > window:
        return left - window  # the first line, when the window opens
    if left <= 2 * MIN_GAP:
        return left  # the expiry line
    return left / 2  # then each time half of what was left is gone


def _duration(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.1f} hours"
    if seconds >= 120:
        return f"{seconds / 60:.0f} minutes"
    return f"{seconds:.0f} seconds"


async def watch(credentials: Callable[[], Credentials]) -> None:
    """Log :func:`warning_text` on the :func:`next_warning` schedule, forever."""
    while True:
        creds = credentials()
        not_before, not_after = creds.cert.not_valid_before_utc, creds.not_after
        now = dt.datetime.now(dt.UTC)
        text = warning_text(not_before, not_after, now)
        if text is not None:
            (log.error if now >= not_after else log.warning)("%s", text)
        wait = next_warning(not_before, not_after, now)
        # Wake early if the credentials are replaced (a reload): poll for that
        # cheaply, at most once a minute.
        with trio.move_on_after(wait):
            while credentials() is creds:  # noqa: ASYNC110 - a reload replaces them
                await trio.sleep(60.0)
