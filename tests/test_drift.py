"""trio_tproxy.drift: change notifications repair the interception rules in well under a second.

Two halves.  Without root: the pure pieces (netlink parsing, debouncing,
backoff) and the check loop driven by hand under trio's MockClock.  With root
(``netns``): a namespace with the real table and policy routes, the watcher
running on real netlink sockets opened inside it, and each kind of drift done
with the real tools; every one must be repaired, with one warning line, and
the time from the change to the repair is printed (``pytest -s``).
"""

from __future__ import annotations

import errno
import logging
import math
import socket
import struct
import subprocess
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import pytest
import trio
import trio.testing

from lab.netns import next_prefix
from trio_tproxy import drift
from trio_tproxy.config import Interception
from trio_tproxy.kernel import PolicyRoutes
from trio_tproxy.nft import Nft

TABLE = "trio_tproxy"
ROUTE_TABLE = 10

# --------------------------------------------------------------------------- netlink messages


def nlmsg(type_: int, payload: bytes) -> bytes:
    """One netlink message, padded to 4 bytes as the kernel sends it."""
    data = struct.pack("=IHHII", 16 + len(payload), type_, 0, 0, 0) + payload
    return data + b"\0" * (-len(data) % 4)


def nla(type_: int, value: bytes) -> bytes:
    data = struct.pack("=HH", 4 + len(value), type_) + value
    return data + b"\0" * (-len(data) % 4)


def u32(value: int) -> bytes:
    return struct.pack("=I", value)


def rule_msg(type_: int, family: int, table: int, mark: int | None = 10) -> bytes:
    # fib_rule_hdr: the u8 table says 252 (RT_TABLE_COMPAT) when FRA_TABLE carries it
    header = struct.pack("=BBBBBBBBI", family, 0, 0, 0, min(table, 252), 0, 0, 1, 0)
    attrs = nla(15, u32(table)) + (nla(10, u32(mark)) if mark is not None else b"")
    return nlmsg(type_, header + attrs)


def route_msg(type_: int, family: int, table: int, dst: str | None, dst_len: int) -> bytes:
    header = struct.pack("=BBBBBBBBI", family, dst_len, 0, 0, min(table, 252), 2, 254, 2, 0)
    attrs = nla(15, u32(table))
    if dst is not None:
        attrs += nla(1, socket.inet_pton(family, dst))
    return nlmsg(type_, header + attrs)


def link_msg(type_: int, name: str, up: bool) -> bytes:
    header = struct.pack("=BxHiII", 0, 772, 1, 0x49 if up else 0x8, 0)
    return nlmsg(type_, header + nla(3, name.encode() + b"\0"))


def nft_msg(msg: int, table: str, family: int = 1) -> bytes:
    header = struct.pack("=BBH", family, 0, 0)
    return nlmsg(10 << 8 | msg, header + nla(1, table.encode() + b"\0"))


# --------------------------------------------------------------------------- parsing


def test_route_events_keep_what_touches_our_table_and_lo() -> None:
    data = b"".join(
        [
            rule_msg(33, socket.AF_INET, 10),  # RTM_DELRULE, ours
            rule_msg(33, socket.AF_INET6, 10),
            rule_msg(33, socket.AF_INET, 100),  # another table's rule
            rule_msg(32, socket.AF_INET, 10),  # RTM_NEWRULE: not drift
            route_msg(25, socket.AF_INET6, 10, "::", 0),  # RTM_DELROUTE, ours
            route_msg(25, socket.AF_INET, 10, None, 0),  # default route: no RTA_DST
            route_msg(25, socket.AF_INET, 254, "10.0.0.0", 8),  # main table
            route_msg(24, socket.AF_INET6, 10, "::", 0),  # RTM_NEWROUTE
            link_msg(16, "lo", up=False),
            link_msg(16, "lo", up=True),
            link_msg(16, "eth0", up=False),  # not lo
            link_msg(17, "lo", up=False),  # RTM_DELLINK
        ]
    )
    assert drift.route_events(data, 10) == [
        "ip rule del fwmark 10 lookup 10",
        "ip -6 rule del fwmark 10 lookup 10",
        "ip -6 route del local ::/0 table 10",
        "ip route del local 0.0.0.0/0 table 10",
        "link lo down",
        "link lo up",
        "link lo deleted",
    ]


def test_route_table_above_255_is_read_from_the_attribute() -> None:
    assert drift.route_events(rule_msg(33, socket.AF_INET, 1000, mark=None), 1000) == [
        "ip rule del lookup 1000"
    ]
    assert drift.route_events(rule_msg(33, socket.AF_INET, 1000), 10) == []


def test_nft_events_keep_changes_to_our_inet_table() -> None:
    data = b"".join(
        [
            nft_msg(8, TABLE),  # DELRULE
            nft_msg(11, TABLE),  # DELSET
            nft_msg(5, TABLE),  # DELCHAIN
            nft_msg(2, TABLE),  # DELTABLE
            nft_msg(15, ""),  # NEWGEN: ends every transaction
            nft_msg(2, "other"),  # someone else's table
            nft_msg(2, TABLE, family=2),  # `ip trio_tproxy`, not `inet`
            nft_msg(0, TABLE),  # NEWTABLE: our own repair
            nft_msg(12, TABLE),  # NEWSETELEM
            nft_msg(6, TABLE),  # NEWRULE: an inserted rule may open a hole
            nlmsg(1 << 8 | 2, b"\x01\0\0\0"),  # another nfnetlink subsystem
        ]
    )
    assert drift.nft_events(data, TABLE) == [
        f"nft delete rule inet {TABLE}",
        f"nft delete set inet {TABLE}",
        f"nft delete chain inet {TABLE}",
        f"nft delete table inet {TABLE}",
        f"nft new rule inet {TABLE}",
    ]


def test_overrun_and_garbage() -> None:
    assert drift.route_events(nlmsg(4, b""), 10) == [drift.LOST]
    assert drift.nft_events(nlmsg(4, b""), TABLE) == [drift.LOST]
    # truncated and nonsense datagrams are ignored, never raise
    whole = rule_msg(33, socket.AF_INET, 10)
    for data in (b"", b"\xff" * 7, whole[:20], struct.pack("=IHHII", 3, 33, 0, 0, 0)):
        assert drift.route_events(data, 10) == []
        assert drift.nft_events(data, TABLE) == []
    bad_attr = nlmsg(
        33, struct.pack("=BBBBBBBBI", 2, 0, 0, 0, 10, 0, 0, 1, 0) + b"\xff\xff\x0f\x00"
    )
    assert drift.route_events(bad_attr, 10) == ["ip rule del lookup 10"]


def test_summarize() -> None:
    assert drift.summarize(["a", "b", "a", "c"]) == "a, b, c"
    assert drift.summarize(list("abcdef"), limit=3) == "a, b, c and 3 more"


class FakeSocket:
    def __init__(self, results: Sequence[bytes | OSError]) -> None:
        self.results = list(results)

    def recv(self, size: int) -> bytes:
        if not self.results:
            raise BlockingIOError(errno.EAGAIN, "empty")
        result = self.results.pop(0)
        if isinstance(result, OSError):
            raise result
        return result


def test_drain_reads_everything_and_reports_lost_notifications() -> None:
    sock = FakeSocket(
        [
            rule_msg(33, socket.AF_INET, 10),
            OSError(errno.ENOBUFS, "No buffer space available"),
            link_msg(16, "lo", up=False),
        ]
    )
    events = drift.drain(sock, lambda data: drift.route_events(data, 10))
    assert events == ["ip rule del fwmark 10 lookup 10", drift.LOST, "link lo down"]
    assert sock.results == []


def test_drain_raises_other_errors() -> None:
    with pytest.raises(OSError, match="bad fd"):
        drift.drain(FakeSocket([OSError(errno.EBADF, "bad fd")]), lambda data: [])


# --------------------------------------------------------------------------- scheduling


def test_debounce_waits_for_quiet_but_at_most_max_delay() -> None:
    d = drift.Debounce(settle=0.01, max_delay=0.05)
    assert d.due() == math.inf
    d.note(1.0)
    assert d.due() == pytest.approx(1.01)
    d.note(1.008)  # a burst keeps pushing it back...
    assert d.due() == pytest.approx(1.018)
    for t in (1.02, 1.03, 1.04, 1.045):
        d.note(t)
    assert d.due() == pytest.approx(1.05)  # ...but never past first + max_delay
    assert d.take() == 1.0
    assert d.due() == math.inf
    assert d.take() is None


def test_backoff_doubles_up_to_the_cap() -> None:
    assert [drift.backoff(n) for n in range(1, 9)] == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    assert drift.backoff(3, base=1.0, cap=2.0) == 2.0


class Repairs:
    """A scripted check_and_repair: each call pops the next answer (exceptions are raised)."""

    def __init__(self, answers: Sequence[Sequence[str] | Exception] = ()) -> None:
        self.answers = list(answers)
        self.calls = 0

    def __call__(self) -> Sequence[str]:
        self.calls += 1
        answer = self.answers.pop(0) if self.answers else ()
        if isinstance(answer, Exception):
            raise answer
        return answer


async def inline(fn: Callable[[], Sequence[str]]) -> Sequence[str]:
    return fn()


async def run_loop(
    repairs: Repairs,
    script: Callable[[drift._State, trio.MemoryReceiveChannel[drift.Check]], object],
    fallback: float = 5.0,
) -> None:
    state = drift._State(drift.Debounce(settle=0.01, max_delay=0.05))
    send, receive = trio.open_memory_channel[drift.Check](math.inf)
    async with trio.open_nursery() as nursery:
        # inline, not in a thread: MockClock's autojump would fire while a thread runs
        nursery.start_soon(drift._check_loop, repairs, state, fallback, send.send_nowait, inline)
        await script(state, receive)  # type: ignore[misc]
        nursery.cancel_scope.cancel()


def test_loop_checks_at_start_then_on_events_then_periodically(
    caplog: pytest.LogCaptureFixture,
) -> None:
    repairs = Repairs([(), ["nft table inet t"], ()])

    async def script(state: drift._State, checks: trio.MemoryReceiveChannel[drift.Check]) -> None:
        start = trio.current_time()
        check = await checks.receive()
        assert (check.trigger, check.restored, check.started) == ("start", (), start)
        await trio.sleep(1.0)
        # a burst of events 3 ms apart: one check, 10 ms after the last one
        for event in ("nft delete rule inet t", "nft delete table inet t"):
            state.note([event])
            await trio.sleep(0.003)
        first = trio.current_time() - 0.006
        check = await checks.receive()
        assert check.trigger == "nft delete rule inet t, nft delete table inet t"
        assert check.first_event == pytest.approx(first)
        assert check.started == pytest.approx(first + 0.003 + 0.01)
        assert check.restored == ("nft table inet t",)
        # nothing more until the fallback poll
        check = await checks.receive()
        assert check.trigger == "periodic check"
        assert check.started == pytest.approx(first + 0.013 + 5.0)

    with caplog.at_level(logging.INFO, logger="trio_tproxy"):
        trio.run(run_loop, repairs, script, clock=trio.testing.MockClock(autojump_threshold=0))
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].getMessage() == (
        "restored nft table inet t (drift: nft delete rule inet t, nft delete table inet t; "
        "repaired in 13 ms)"
    )


def test_loop_never_delays_a_burst_more_than_max_delay() -> None:
    async def script(state: drift._State, checks: trio.MemoryReceiveChannel[drift.Check]) -> None:
        await checks.receive()  # start
        first = trio.current_time()
        for _ in range(40):  # an event every 5 ms for 200 ms
            state.note(["link lo down"])
            await trio.sleep(0.005)
        check = await checks.receive()
        assert check.first_event == first
        assert check.started == pytest.approx(first + 0.05)

    trio.run(run_loop, Repairs(), script, clock=trio.testing.MockClock(autojump_threshold=0))


def test_loop_survives_failures_with_backoff(caplog: pytest.LogCaptureFixture) -> None:
    boom = OSError("nft: no answer after 30s")
    repairs = Repairs([(), boom, boom, RuntimeError("bug"), ["ip rule fwmark 10"]])

    async def script(state: drift._State, checks: trio.MemoryReceiveChannel[drift.Check]) -> None:
        await checks.receive()  # start
        state.note(["ip rule del fwmark 10 lookup 10"])
        seen = [await checks.receive() for _ in range(4)]
        assert [c.error for c in seen] == [str(boom), str(boom), "bug", None]
        # each retry is about the drift that failed, and so is the final warning
        assert [c.trigger for c in seen] == ["ip rule del fwmark 10 lookup 10"] * 4
        assert {c.first_event for c in seen} == {seen[0].first_event}
        gaps = [b.started - a.finished for a, b in zip(seen, seen[1:], strict=False)]
        assert gaps == pytest.approx([0.1, 0.2, 0.4])
        assert seen[-1].restored == ("ip rule fwmark 10",)

    with caplog.at_level(logging.INFO, logger="trio_tproxy"):
        trio.run(run_loop, repairs, script, clock=trio.testing.MockClock(autojump_threshold=0))
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in lines] == ["ERROR", "ERROR", "ERROR", "WARNING"]
    assert lines[0][1].endswith("nft: no answer after 30s; retrying in 0.1 s")
    assert lines[-1][1] == (
        "restored ip rule fwmark 10 (drift: ip rule del fwmark 10 lookup 10; "
        "repaired in 710 ms, after 3 failed attempts)"
    )


def test_loop_spaces_out_repairs_when_someone_fights_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # every event finds the table gone again
    repairs = Repairs([()] + [["nft table inet t"]] * 30 + [()] * 3 + [["nft table inet t"]])

    async def script(state: drift._State, checks: trio.MemoryReceiveChannel[drift.Check]) -> None:
        await checks.receive()  # start
        seen = []
        for _ in range(30):
            state.note(["nft delete table inet t"])
            seen.append(await checks.receive())
        gaps = [round(b.started - a.finished, 3) for a, b in zip(seen, seen[1:], strict=False)]
        # ten repairs at full speed (10 ms settle), then one a second
        assert gaps == [0.01] * 9 + [1.0] * 20
        # quiet for a while: back to immediate repairs
        for _ in range(3):
            await trio.sleep(drift.FIGHT_WINDOW)
            state.note(["nft delete table inet t"])
            await checks.receive()
        state.note(["nft delete table inet t"])
        before = trio.current_time()
        check = await checks.receive()
        assert check.restored and check.started - before == pytest.approx(0.01)

    with caplog.at_level(logging.INFO, logger="trio_tproxy"):
        trio.run(run_loop, repairs, script, clock=trio.testing.MockClock(autojump_threshold=0))
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [
        "the interception rules were repaired 10 times in 0.1 s: another program keeps "
        "changing them; repairing at most once a second"
    ]


def test_watch_without_notifications_polls(caplog: pytest.LogCaptureFixture) -> None:
    repairs = Repairs([(), (), ["ip -6 route local ::/0 dev lo table 10"]])

    async def main() -> None:
        checks: list[drift.Check] = []
        third = trio.Event()

        def on_check(check: drift.Check) -> None:
            checks.append(check)
            if len(checks) == 3:
                third.set()

        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: drift.watch(
                    repairs,
                    table=TABLE,
                    route_table=ROUTE_TABLE,
                    fallback_interval=2.0,
                    notifications=False,
                    on_check=on_check,
                    task_status=task_status,
                )
            )
            # no timer of ours may be pending while a check runs in its thread:
            # MockClock would jump to it
            await third.wait()
            nursery.cancel_scope.cancel()
        assert [(c.trigger, c.started) for c in checks] == [
            ("start", 0.0),
            ("periodic check", 2.0),
            ("periodic check", 4.0),
        ]

    with caplog.at_level(logging.INFO, logger="trio_tproxy"):
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert [r.getMessage() for r in caplog.records] == [
        "restored ip -6 route local ::/0 dev lo table 10 (drift: periodic check; repaired in 0 ms)"
    ]


def test_reader_without_permission_lets_the_watcher_start_on_the_poll(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened = 0

    async def inline(fn: Callable[[], socket.socket]) -> socket.socket:
        # inline, not in a thread: MockClock's autojump would fire while a thread runs
        await trio.lowlevel.checkpoint()
        return fn()

    monkeypatch.setattr(drift.trio.to_thread, "run_sync", inline)

    def refuse() -> socket.socket:
        nonlocal opened
        opened += 1
        raise PermissionError(errno.EPERM, "Operation not permitted")

    async def main() -> None:
        state = drift._State(drift.Debounce())
        async with trio.open_nursery() as nursery:
            subscribed = await nursery.start(drift._read, refuse, lambda data: [], state, "nft")
            assert subscribed is False
            await trio.sleep(100)  # it keeps trying, quietly, backing off to a minute
            nursery.cancel_scope.cancel()

    with caplog.at_level(logging.INFO, logger="trio_tproxy"):
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert [r.getMessage() for r in caplog.records] == [
        "nft notifications unavailable ([Errno 1] Operation not permitted): "
        "relying on the periodic check"
    ]
    assert 5 <= opened <= 8


def test_reader_reopens_a_broken_socket_and_asks_for_a_check(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pairs: list[tuple[socket.socket, socket.socket]] = []
    answers: list[list[str] | OSError] = [OSError(errno.EIO, "broken"), ["link lo down"]]

    def open_() -> socket.socket:
        pairs.append(socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM))
        pairs[-1][0].setblocking(False)
        return pairs[-1][0]

    def parse(data: bytes) -> list[str]:
        answer = answers.pop(0)
        if isinstance(answer, OSError):
            raise answer
        return answer

    async def main() -> None:
        state = drift._State(drift.Debounce())
        async with trio.open_nursery() as nursery:
            assert await nursery.start(drift._read, open_, parse, state, "route") is True
            pairs[0][1].send(b"x")
            await state.wake.wait()
            assert state.events == ["route notification socket failed"]
            state.wake = trio.Event()
            await state.wake.wait()  # reopened
            assert len(pairs) == 2 and pairs[0][0].fileno() == -1  # the old one is closed
            pairs[1][1].send(b"x")
            while len(state.events) < 3:
                state.wake = trio.Event()
                await state.wake.wait()
            nursery.cancel_scope.cancel()
        assert state.events == [
            "route notification socket failed",
            "route notifications back",
            "link lo down",
        ]

    try:
        with caplog.at_level(logging.INFO, logger="trio_tproxy"):
            trio.run(main)
    finally:
        for pair in pairs:
            for sock in pair:
                sock.close()
    assert [r.getMessage() for r in caplog.records] == [
        "route notification socket failed ([Errno 5] broken): reopening it"
    ]


# --------------------------------------------------------------------------- kernel path

#: Seconds within which a repair must be seen: loose on purpose (the figure that
#: matters is printed, and is in milliseconds); a 5 s poll would miss it.
DEADLINE = 3.0
MARKER = "192.0.2.1"


def ip_netns(ns: str, *argv: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, *argv], check=True, capture_output=True, text=True)


@contextmanager
def namespace() -> Iterator[str]:
    name = f"{next_prefix()}-drift"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        ip_netns(name, "ip", "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True)


class Installed:
    """The minimal check_and_repair (the installer proper lives elsewhere): table, then routes."""

    def __init__(self, ns: str) -> None:
        self.ic = Interception(table=TABLE, route_table=ROUTE_TABLE)
        self.nft = Nft(netns=ns)
        self.routes = PolicyRoutes(self.ic, netns=ns)

    def install(self) -> None:
        self.nft.apply(self.ic)
        self.routes.install()

    def __call__(self) -> list[str]:
        restored = []
        if self.nft.list_table(self.ic) is None:
            self.nft.apply(self.ic)
            restored.append(f"nft table inet {self.ic.table}")
        return restored + self.routes.repair()


RULE4 = "ip rule fwmark 10 iif lo lookup 10"
RULE6 = "ip -6 rule fwmark 10 iif lo lookup 10"
ROUTE6 = "ip -6 route local ::/0 dev lo table 10"
KEEP4 = "ip rule fwmark 13 iif lo lookup 10"
KEEP6 = "ip -6 rule fwmark 13 iif lo lookup 10"
INCIDENTS = [
    ("nft delete table", ["nft", "delete", "table", "inet", TABLE], f"nft table inet {TABLE}"),
    ("nft flush ruleset", ["nft", "flush", "ruleset"], f"nft table inet {TABLE}"),
    ("ip rule del", ["ip", "rule", "del", "fwmark", "10", "iif", "lo", "lookup", "10"], RULE4),
    (
        "ip -6 rule del",
        ["ip", "-6", "rule", "del", "fwmark", "10", "iif", "lo", "lookup", "10"],
        RULE6,
    ),
    ("ip -6 route del", ["ip", "-6", "route", "del", "local", "::/0", "table", "10"], ROUTE6),
    # the client-address rules (preserve mark 13)
    ("ip rule del 13", ["ip", "rule", "del", "fwmark", "13", "iif", "lo", "lookup", "10"], KEEP4),
    (
        "ip -6 rule del 13",
        ["ip", "-6", "rule", "del", "fwmark", "13", "iif", "lo", "lookup", "10"],
        KEEP6,
    ),
    ("lo down; lo up", ["sh", "-c", "ip link set lo down; ip link set lo up"], ROUTE6),
]


@pytest.mark.netns
def test_each_kind_of_drift_is_repaired_within_milliseconds_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    figures: list[str] = []

    async def main(ns: str, installed: Installed) -> None:
        send, checks = trio.open_memory_channel[drift.Check](math.inf)

        async def next_check(until: Callable[[drift.Check], bool], what: str) -> drift.Check:
            with trio.move_on_after(DEADLINE):
                async for check in checks:
                    assert check.error is None, check
                    if until(check):
                        return check
            raise AssertionError(f"{what}: no such check within {DEADLINE} s")

        async def settled() -> None:
            """Every consequence of what happened so far has been checked.

            A route added and deleted in our table is an event the watcher
            reacts to; once a check has seen it, everything before it has
            been seen too (one socket, in order; the nft socket's events
            were queued before the repair that caused them returned).
            """
            argv = ["route", "add", "blackhole", f"{MARKER}/32", "table", "10"]
            await trio.run_process(["ip", "-n", ns, *argv], capture_stdout=True)
            argv[1] = "del"
            await trio.run_process(["ip", "-n", ns, *argv], capture_stdout=True)
            await next_check(lambda c: MARKER in c.trigger, "marker")

        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: drift.watch(
                    installed,
                    table=TABLE,
                    route_table=ROUTE_TABLE,
                    netns=ns,
                    fallback_interval=60.0,  # the poll must not be what repairs
                    on_check=send.send_nowait,
                    task_status=task_status,
                )
            )
            start = await next_check(lambda c: True, "start")
            assert start.trigger == "start" and start.restored == ()
            for name, argv, expected in INCIDENTS:
                caplog.clear()
                before = trio.current_time()
                await trio.run_process(["ip", "netns", "exec", ns, *argv], capture_stdout=True)
                changed = trio.current_time()
                repair = await next_check(lambda c: bool(c.restored), name)
                assert expected in repair.restored, (name, repair)
                assert repair.first_event is not None
                figures.append(
                    f"{name:18} change->repair {1000 * (repair.finished - before):6.1f} ms "
                    f"(command ran {1000 * (changed - before):5.1f} ms, event->check "
                    f"{1000 * (repair.started - repair.first_event):4.1f} ms, check "
                    f"{1000 * (repair.finished - repair.started):5.1f} ms) "
                    f"restored {', '.join(repair.restored)}; trigger: {repair.trigger}"
                )
                assert repair.finished - before < DEADLINE
                await settled()
                warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
                assert len(warnings) == 1, (name, warnings)
                assert warnings[0].startswith("restored ") and expected in warnings[0]
            nursery.cancel_scope.cancel()
        assert installed() == []  # everything is back in place

    with namespace() as ns:
        installed = Installed(ns)
        installed.install()
        with caplog.at_level(logging.INFO, logger="trio_tproxy"):
            trio.run(main, ns, installed)
    print("\n" + "\n".join(figures))


@pytest.mark.netns
def test_fallback_poll_repairs_without_notifications(caplog: pytest.LogCaptureFixture) -> None:
    async def main(ns: str, installed: Installed) -> None:
        started, repaired = trio.Event(), trio.Event()

        def on_check(check: drift.Check) -> None:
            started.set()
            if check.restored:
                repaired.set()

        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: drift.watch(
                    installed,
                    table=TABLE,
                    route_table=ROUTE_TABLE,
                    netns=ns,
                    fallback_interval=0.3,
                    notifications=False,
                    on_check=on_check,
                    task_status=task_status,
                )
            )
            with trio.fail_after(DEADLINE):
                await started.wait()  # the check at start has run
            await trio.run_process(["ip", "netns", "exec", ns, "nft", "flush", "ruleset"])
            with trio.fail_after(DEADLINE):
                await repaired.wait()
            nursery.cancel_scope.cancel()

    with namespace() as ns:
        installed = Installed(ns)
        installed.install()
        with caplog.at_level(logging.INFO, logger="trio_tproxy"):
            trio.run(main, ns, installed)
        assert installed() == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [
        m for m in warnings if m.startswith(f"restored nft table inet {TABLE} (drift: periodic")
    ]
    assert len(warnings) == 1


@pytest.mark.netns
def test_an_overrun_socket_reports_lost_notifications() -> None:
    """The kernel's ENOBUFS, for real: a tiny receive buffer and a burst nobody reads."""
    with namespace() as ns:
        sock = drift.open_nft_socket(ns)
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # the kernel's minimum
            rules = "".join(
                f"add rule inet {TABLE} c tcp dport {p} accept\n" for p in range(1, 300)
            )
            chain = f"add table inet {TABLE}\nadd chain inet {TABLE} c\n"
            subprocess.run(
                ["ip", "netns", "exec", ns, "nft", "-f", "-"],
                input=chain + rules,
                check=True,
                capture_output=True,
                text=True,
            )
            events = drift.drain(sock, lambda data: drift.nft_events(data, TABLE))
            assert drift.LOST in events
            # and the socket goes on working afterwards
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            ip_netns(ns, "nft", "delete", "table", "inet", TABLE)
            events = drift.drain(sock, lambda data: drift.nft_events(data, TABLE))
            assert drift.LOST not in events
            assert events[-1] == f"nft delete table inet {TABLE}"
