"""Drift watcher: repair the interception rules within milliseconds of someone breaking them.

Theory of operation
-------------------
The nftables table and the policy rules/routes are what keep the pod's
traffic inside mutual TLS; anything that removes them (an operator's ``nft
flush ruleset``, another agent, ``ip link set lo down``) opens the pod until
they are back.  Polling every few seconds leaves seconds of plaintext, so
this module *listens* for changes instead, on two netlink sockets in the
sidecar's network namespace:

* ``NETLINK_ROUTE`` bound to the link, IPv4/IPv6 route and IPv4/IPv6 rule
  multicast groups.  Relevant: a rule or route of our route table deleted,
  and ``lo`` changing state or vanishing (the IPv6 local route dies with it).
* ``NETLINK_NETFILTER`` joined to ``NFNLGRP_NFTABLES``: the same messages
  ``nft monitor`` prints, read directly.  Relevant: any table, chain, rule,
  set or element of our table deleted (``nft flush ruleset`` and ``delete
  table`` send one message per object, then ``NEWGEN``), and rules or chains
  added to it (an inserted ``accept`` could open a hole; checking costs
  little).

Why netlink rather than an ``nft monitor`` child process: measured in a
namespace, both see a ``delete table`` within the same 4-7 ms, but the socket
costs no process (``nft monitor`` is 3.5 MB RSS per sidecar, plus restart
logic when it dies), no text parsing of a format that changes between nft
versions, and lost messages are reported (``ENOBUFS``) instead of silently
dropped; it is read exactly like the route socket.

Each datagram is parsed by a pure function (:func:`route_events`,
:func:`nft_events`) into short descriptions of the relevant changes;
everything else is ignored.  The first relevant change arms a
:class:`Debounce`: the check runs once the events have been quiet for
``settle`` seconds, and never later than ``max_delay`` after the first one,
so one burst (a flushed ruleset is a dozen messages) is one check.

The check itself is the caller's ``check_and_repair``: a blocking function
(nft and netlink calls) run in a worker thread, returning what it restored.
A non-empty answer is logged as ONE warning line naming what was restored,
what changed and how long after the change was seen.  An exception is logged
as one error line and the check is retried with exponential backoff; the
watcher never dies of it.  If notifications were lost (``ENOBUFS``) the
check runs at once; and a slow fallback poll runs anyway in case the kernel
dropped something without telling.  If the sockets cannot be opened at all,
the watcher says so once and keeps the poll.

Our own repairs generate events too (re-applying the table deletes and
re-creates it in one transaction): they cause one follow-up check that finds
nothing to do and logs nothing.  If another program keeps undoing the rules
(:data:`FIGHT_REPAIRS` repairs within :data:`FIGHT_WINDOW` seconds, a rate no
operator reaches by hand), the watcher says so in one error line and repairs
at most once a second, so two controllers cannot spin the CPU or flood the
log; it goes back to immediate repairs once left alone for FIGHT_WINDOW.

Shutdown: the caller must cancel the watcher *before* removing the rules
(run it in its own cancel scope, cancel, then remove).  A check in progress
is not abandoned: cancellation waits for the worker thread to finish, so no
repair can race the removal.
"""

from __future__ import annotations

import errno
import logging
import math
import socket
import struct
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import trio

from . import rtnl

log = logging.getLogger("trio_tproxy")

#: This many repairs within FIGHT_WINDOW seconds: someone is undoing our rules.
FIGHT_REPAIRS: Final = 10
FIGHT_WINDOW: Final = 2.0
#: Seconds between repairs while fighting.
FIGHT_PAUSE: Final = 1.0

# --------------------------------------------------------------------------- netlink constants

SOL_NETLINK: Final = 270
NETLINK_ADD_MEMBERSHIP: Final = 1
NETLINK_NETFILTER: Final = 12
NFNLGRP_NFTABLES: Final = 7

#: rtnetlink multicast groups, as the legacy bitmask bound at ``bind()``
#: (bit n-1 is group n; RTNLGRP_IPV6_RULE = 19 has no RTMGRP_ name).
RTMGRP_LINK: Final = 0x1
RTMGRP_IPV4_ROUTE: Final = 0x40
RTMGRP_IPV4_RULE: Final = 0x80
RTMGRP_IPV6_ROUTE: Final = 0x400
RTMGRP_IPV6_RULE: Final = 1 << (19 - 1)
ROUTE_GROUPS: Final = (
    RTMGRP_LINK | RTMGRP_IPV4_ROUTE | RTMGRP_IPV4_RULE | RTMGRP_IPV6_ROUTE | RTMGRP_IPV6_RULE
)

_NLMSG_HDR: Final = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_NLA_HDR: Final = struct.Struct("=HH")  # len, type
_NLA_TYPE_MASK: Final = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
_NLMSG_ERROR: Final = 2
_NLMSG_OVERRUN: Final = 4

RTM_NEWLINK: Final = 16
RTM_DELLINK: Final = 17
RTM_DELROUTE: Final = 25
RTM_DELRULE: Final = 33
_IFINFOMSG: Final = struct.Struct("=BxHiII")  # family, type, index, flags, change
_RTMSG: Final = struct.Struct(
    "=BBBBBBBBI"
)  # family, dst_len, src_len, tos, table, proto, scope, type, flags
_FIB_RULE_HDR: Final = struct.Struct(
    "=BBBBBBBBI"
)  # family, dst_len, src_len, tos, table, -, -, action, flags
_IFLA_IFNAME: Final = 3
_RTA_DST: Final = 1
_RTA_TABLE: Final = 15
_FRA_TABLE: Final = 15
_FRA_FWMARK: Final = 10
_IFF_UP: Final = 0x1
_RTN_TYPES: Final = {1: "", 2: "local ", 3: "broadcast ", 6: "blackhole ", 7: "unreachable "}

NFNL_SUBSYS_NFTABLES: Final = 10
_NFGENMSG: Final = struct.Struct("=BBH")  # family, version, res_id
_NFTA_TABLE: Final = 1  # NFTA_TABLE_NAME, and NFTA_{CHAIN,RULE,SET,SET_ELEM_LIST}_TABLE
_NFPROTO_INET: Final = 1
#: nftables message types worth a check, by what they say happened.
_NFT_MESSAGES: Final = {
    2: "delete table",
    3: "new chain",
    5: "delete chain",
    6: "new rule",
    8: "delete rule",
    11: "delete set",
    14: "delete element",
    20: "delete object",
    24: "delete flowtable",
}

#: What the watcher records when the kernel dropped notifications.
LOST: Final = "netlink overrun: notifications lost"


# --------------------------------------------------------------------------- parsing (pure)


def _messages(data: bytes) -> Iterable[tuple[int, bytes]]:
    """(type, payload) of each netlink message in one datagram; a truncated tail is dropped."""
    offset = 0
    while offset + _NLMSG_HDR.size <= len(data):
        length, type_, _flags, _seq, _pid = _NLMSG_HDR.unpack_from(data, offset)
        if length < _NLMSG_HDR.size or offset + length > len(data):
            return
        yield type_, data[offset + _NLMSG_HDR.size : offset + length]
        offset += (length + 3) & ~3


def _attrs(payload: bytes, offset: int) -> dict[int, bytes]:
    """The top-level attributes after a fixed header of ``offset`` bytes (first of each type)."""
    found: dict[int, bytes] = {}
    while offset + _NLA_HDR.size <= len(payload):
        length, type_ = _NLA_HDR.unpack_from(payload, offset)
        if length < _NLA_HDR.size or offset + length > len(payload):
            break
        found.setdefault(type_ & _NLA_TYPE_MASK, payload[offset + _NLA_HDR.size : offset + length])
        offset += (length + 3) & ~3
    return found


def _u32(value: bytes | None) -> int | None:
    return struct.unpack("=I", value[:4])[0] if value is not None and len(value) >= 4 else None


def _cstr(value: bytes | None) -> str | None:
    return value.split(b"\0", 1)[0].decode(errors="replace") if value is not None else None


def _ip(family: int) -> str:
    return "ip -6" if family == socket.AF_INET6 else "ip"


def route_events(data: bytes, route_table: int) -> list[str]:
    """The changes in one rtnetlink datagram that may have broken interception.

    Relevant: a rule or route of ``route_table`` deleted; ``lo`` reported up,
    down or deleted.  Each is described in ``ip`` words, e.g. ``"ip -6 route
    del local ::/0 table 10"``.  An overrun message gives :data:`LOST`.
    """
    events: list[str] = []
    for type_, payload in _messages(data):
        if type_ == _NLMSG_OVERRUN:
            events.append(LOST)
        elif type_ == RTM_DELRULE and len(payload) >= _FIB_RULE_HDR.size:
            family, *_, table, _r1, _r2, _action, _flags = _FIB_RULE_HDR.unpack_from(payload)
            attrs = _attrs(payload, _FIB_RULE_HDR.size)
            table = _u32(attrs.get(_FRA_TABLE)) or table
            if table == route_table:
                mark = _u32(attrs.get(_FRA_FWMARK))
                what = f" fwmark {mark}" if mark is not None else ""
                events.append(f"{_ip(family)} rule del{what} lookup {table}")
        elif type_ == RTM_DELROUTE and len(payload) >= _RTMSG.size:
            family, dst_len, _src, _tos, table, _proto, _scope, rtype, _fl = _RTMSG.unpack_from(
                payload
            )
            attrs = _attrs(payload, _RTMSG.size)
            table = _u32(attrs.get(_RTA_TABLE)) or table
            if table == route_table:
                dst = attrs.get(_RTA_DST)
                if dst is not None and len(dst) in (4, 16):
                    prefix = socket.inet_ntop(family, dst)
                else:
                    prefix = "::" if family == socket.AF_INET6 else "0.0.0.0"
                kind = _RTN_TYPES.get(rtype, "")
                events.append(f"{_ip(family)} route del {kind}{prefix}/{dst_len} table {table}")
        elif type_ in (RTM_NEWLINK, RTM_DELLINK) and len(payload) >= _IFINFOMSG.size:
            _family, _type, _index, flags, _change = _IFINFOMSG.unpack_from(payload)
            if _cstr(_attrs(payload, _IFINFOMSG.size).get(_IFLA_IFNAME)) != "lo":
                continue
            if type_ == RTM_DELLINK:
                events.append("link lo deleted")
            else:
                events.append("link lo up" if flags & _IFF_UP else "link lo down")
    return events


def nft_events(data: bytes, table: str) -> list[str]:
    """The changes to ``inet <table>`` in one nfnetlink datagram, in ``nft`` words.

    E.g. ``"nft delete table inet trio_tproxy"``.  Messages of other tables,
    families or subsystems, and creations other than rules and chains, are
    ignored.  An overrun message gives :data:`LOST`.
    """
    events: list[str] = []
    for type_, payload in _messages(data):
        if type_ == _NLMSG_OVERRUN:
            events.append(LOST)
            continue
        if type_ >> 8 != NFNL_SUBSYS_NFTABLES or len(payload) < _NFGENMSG.size:
            continue
        what = _NFT_MESSAGES.get(type_ & 0xFF)
        family = payload[0]
        if what is None or family != _NFPROTO_INET:
            continue
        if _cstr(_attrs(payload, _NFGENMSG.size).get(_NFTA_TABLE)) == table:
            events.append(f"nft {what} inet {table}")
    return events


def summarize(events: Sequence[str], limit: int = 4) -> str:
    """Distinct events in order of arrival, at most ``limit`` of them named."""
    distinct = list(dict.fromkeys(events))
    shown = ", ".join(distinct[:limit])
    return shown + (f" and {len(distinct) - limit} more" if len(distinct) > limit else "")


# --------------------------------------------------------------------------- scheduling (pure)


@dataclass
class Debounce:
    """When to run the check for a burst of events: once quiet, or at the latest ``max_delay``.

    Times are whatever clock the caller uses (``trio.current_time()``).
    """

    settle: float = 0.01
    max_delay: float = 0.05
    first: float | None = None
    last: float | None = None

    def note(self, now: float) -> None:
        if self.first is None:
            self.first = now
        self.last = now

    def due(self) -> float:
        """The time the check should run; ``inf`` when no event is pending."""
        if self.first is None or self.last is None:
            return math.inf
        return min(self.last + self.settle, self.first + self.max_delay)

    def take(self) -> float | None:
        """Forget the burst; return when its first event was seen."""
        first, self.first, self.last = self.first, None, None
        return first


def backoff(attempt: int, base: float = 0.1, cap: float = 5.0) -> float:
    """Seconds before retry number ``attempt`` (1, 2, ...): doubling from ``base``, at most ``cap``."""
    return float(min(cap, base * 2 ** max(0, attempt - 1)))


# --------------------------------------------------------------------------- sockets


def _open_socket(protocol: int, groups: int, netns: str | None) -> socket.socket:
    # With a namespace, the thread enters it to create the socket and comes
    # back: the socket stays in that namespace, this process where it is.
    sock = rtnl.open_socket(protocol, netns)
    try:
        sock.setblocking(False)
        sock.bind((0, groups))
        return sock
    except BaseException:
        sock.close()
        raise


def open_route_socket(netns: str | None = None) -> socket.socket:
    """An rtnetlink socket receiving link, route and rule notifications."""
    return _open_socket(socket.NETLINK_ROUTE, ROUTE_GROUPS, netns)


def open_nft_socket(netns: str | None = None) -> socket.socket:
    """An nfnetlink socket receiving nftables notifications (needs CAP_NET_ADMIN)."""
    sock = _open_socket(NETLINK_NETFILTER, 0, netns)
    try:
        sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
    except BaseException:
        sock.close()
        raise
    return sock


def drain(sock: Any, parse: Callable[[bytes], list[str]]) -> list[str]:
    """Read every datagram waiting on a non-blocking netlink socket; the relevant events.

    ``ENOBUFS`` means the kernel dropped notifications: :data:`LOST`, so that
    the caller checks at once.
    """
    events: list[str] = []
    while True:
        try:
            data = sock.recv(1 << 16)
        except BlockingIOError:
            return events
        except OSError as exc:
            if exc.errno != errno.ENOBUFS:
                raise
            events.append(LOST)
            continue
        if not data:
            return events
        events.extend(parse(data))


# --------------------------------------------------------------------------- the watcher


@dataclass(frozen=True)
class Check:
    """One run of ``check_and_repair``, as reported to ``on_check``."""

    #: What prompted it: the events seen, ``"start"`` or ``"periodic check"`` (a retry
    #: after a failure repeats the failed check's trigger).
    trigger: str
    restored: tuple[str, ...] = ()
    error: str | None = None
    #: ``trio.current_time()`` of the first event of the burst (None: not event-driven).
    first_event: float | None = None
    started: float = 0.0
    finished: float = 0.0


@dataclass
class _State:
    debounce: Debounce
    events: list[str] = field(default_factory=list)
    wake: trio.Event = field(default_factory=trio.Event)

    def note(self, events: list[str]) -> None:
        if events:
            self.events.extend(events)
            self.debounce.note(trio.current_time())
            self.wake.set()


async def _read(
    open_: Callable[[], socket.socket],
    parse: Callable[[bytes], list[str]],
    state: _State,
    name: str,
    task_status: trio.TaskStatus[bool] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Feed one netlink socket's relevant events to ``state``; reopen it if it breaks."""
    attempt = 0
    started = False
    while True:
        try:
            sock = await trio.to_thread.run_sync(open_)
        except OSError as exc:
            attempt += 1
            if not started:
                # Say it once and let the watcher start: the fallback poll still runs.
                log.error(
                    "%s notifications unavailable (%s): relying on the periodic check", name, exc
                )
                started = True
                task_status.started(False)
            await trio.sleep(backoff(attempt, base=1.0, cap=60.0))
            continue
        if not started:
            started = True
            task_status.started(True)
        elif attempt:
            state.note([f"{name} notifications back"])  # we may have missed something
        attempt = 0
        try:
            with sock:
                while True:
                    await trio.lowlevel.wait_readable(sock)
                    state.note(drain(sock, parse))
        except OSError as exc:
            attempt += 1
            log.error("%s notification socket failed (%s): reopening it", name, exc)
            state.note([f"{name} notification socket failed"])
            await trio.sleep(backoff(attempt, base=0.1, cap=5.0))


async def watch(
    check_and_repair: Callable[[], Sequence[str]],
    *,
    table: str,
    route_table: int,
    netns: str | None = None,
    fallback_interval: float = 5.0,
    settle: float = 0.01,
    max_delay: float = 0.05,
    notifications: bool = True,
    on_check: Callable[[Check], None] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep the rules in place until cancelled (see the module docstring).

    ``check_and_repair`` is blocking (run in a worker thread) and returns what
    it restored, empty if nothing was missing.  ``table`` is the nft table
    (family ``inet``) and ``route_table`` the policy-routing table whose
    changes matter.  ``netns`` (tests) opens the sockets in that named
    namespace.  ``notifications=False`` leaves only the fallback poll.
    ``on_check`` is called in the trio thread after every check (tests,
    metrics).

    Started (``nursery.start``) once subscribed; then checks once at once, so
    a change between installing and subscribing is not missed.  Cancel it
    before removing the rules.
    """
    state = _State(Debounce(settle=settle, max_delay=max_delay))
    async with trio.open_nursery() as nursery:
        if notifications:
            await nursery.start(
                _read,
                lambda: open_route_socket(netns),
                lambda data: route_events(data, route_table),
                state,
                "route",
            )
            await nursery.start(
                _read,
                lambda: open_nft_socket(netns),
                lambda data: nft_events(data, table),
                state,
                "nftables",
            )
        task_status.started()
        await _check_loop(check_and_repair, state, fallback_interval, on_check)


async def _check_loop(
    check_and_repair: Callable[[], Sequence[str]],
    state: _State,
    fallback_interval: float,
    on_check: Callable[[Check], None] | None,
    run_sync: Callable[[Callable[[], Sequence[str]]], Awaitable[Sequence[str]]] = (
        trio.to_thread.run_sync
    ),
) -> None:
    last_finished = trio.current_time()
    next_poll = last_finished  # the first check runs at once
    retry_at = math.inf
    failures = 0
    repairs: deque[float] = deque(maxlen=FIGHT_REPAIRS)  # when the latest ones finished
    fighting = False
    first_check = True
    # What a failed check was about, carried to its retry (so that the final
    # warning names the original drift and times the repair from it).
    carried_events: list[str] = []
    carried_first: float | None = None
    carried_trigger = "periodic check"
    while True:
        if failures:
            # Backing off: events wait for the retry, which checks them too.
            due = retry_at
        else:
            due = min(state.debounce.due(), next_poll)
            if fighting and trio.current_time() - repairs[-1] >= FIGHT_WINDOW:
                fighting = False  # left alone for a while: back to immediate repairs
                repairs.clear()
            if fighting:
                due = max(due, repairs[-1] + FIGHT_PAUSE)
        if trio.current_time() < due:
            with trio.move_on_at(due):
                await state.wake.wait()
            state.wake = trio.Event()
            continue

        first_event = state.debounce.take()
        if carried_first is not None:
            first_event = carried_first
        events, state.events = carried_events + state.events, []
        if events:
            trigger = summarize(events)
        elif first_check:
            trigger = "start"
        elif failures:
            trigger = carried_trigger
        else:
            trigger = "periodic check"
        first_check = False
        started = trio.current_time()
        restored: tuple[str, ...] = ()
        error = None
        try:
            # Blocking (nft processes, netlink dumps): off the event loop.  Not
            # abandoned on cancel, so cancelling waits for a repair to finish.
            restored = tuple(await run_sync(check_and_repair))
        except Exception as exc:
            failures += 1
            delay = backoff(failures)
            error = str(exc) or type(exc).__name__
            log.error("drift check failed (%s): %s; retrying in %.1f s", trigger, error, delay)
            last_finished = trio.current_time()
            retry_at = last_finished + delay
            carried_events, carried_first, carried_trigger = events, first_event, trigger
        else:
            last_finished = trio.current_time()
            if restored:
                repairs.append(last_finished)
                span = repairs[-1] - repairs[0]
                if not fighting and len(repairs) == FIGHT_REPAIRS and span < FIGHT_WINDOW:
                    fighting = True
                    log.error(
                        "the interception rules were repaired %d times in %.1f s: another "
                        "program keeps changing them; repairing at most once a second",
                        len(repairs),
                        span,
                    )
                since = first_event if first_event is not None else started
                log.warning(
                    "restored %s (drift: %s; repaired in %.0f ms%s)",
                    ", ".join(restored),
                    trigger,
                    (last_finished - since) * 1000,
                    f", after {failures} failed attempts" if failures else "",
                )
            failures = 0
            retry_at = math.inf
            carried_events, carried_first = [], None
        next_poll = last_finished + fallback_interval
        if on_check is not None:
            on_check(Check(trigger, restored, error, first_event, started, last_finished))
