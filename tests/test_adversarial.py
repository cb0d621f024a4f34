"""Issue 8 as an attacker and an operator would try it, through the kernel (root, netns).

The two-pod lab (:class:`lab.pods.PodLab`), real ``trio-tproxy run`` processes,
clients from :mod:`lab.apps` inside the namespaces.  Each test names the
finding or build item it guards:

* a flood of 5,000 TLS handshakes that never finish, from a host without a
  sidecar: memory and fds bounded, a sidecar-to-sidecar connection succeeds
  during it, no traceback, fds back to idle afterwards (findings 6, item 5);
* a soak of 10,000 short connections plus 1,000 idle ones: no fd or thread
  growth afterwards, memory reported (``TPT_SOAK=N`` multiplies it for a
  longer run; about 80-100 s here, most of it the 10,000 connections);
* idle timeout and half-close inactivity: a server streaming after the
  client's FIN for three times the half-close timeout completes; a silent
  connection is reset after the idle timeout (finding 7);
* the limits: the connection over ``--max-connections`` is reset at accept
  with one line while the others work; one flooding source is held to
  ``--max-pending-per-source`` while another source connects;
* fd exhaustion (``prlimit`` on the running sidecar): one warning, no
  traceback, no "internal error", and recovery once the connections close;
* the restart window: with B's sidecar SIGKILLed and started again while an
  outside client probes B's app in a loop, no probe ever gets plaintext.

Synchronisation is on log lines, process output and /proc counters, each
with a deadline.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from lab import pods
from lab.netns import next_prefix, probe
from lab.pods import PodLab, spiffe_id

pytestmark = pytest.mark.netns

ECHO, STREAM, SERVE = 7001, 7002, 7100
PY = sys.executable
#: The streamer of finding 7, scaled down: half-close timeout 1 s, streaming 3 s.
HALF_CLOSE, STREAM_SECONDS, STREAM_RATE = 1.0, 3.0, 100_000
#: ``TPT_SOAK=10`` runs the soak ten times longer.
SOAK_SCALE = int(os.environ.get("TPT_SOAK", "1"))


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PodLab]:
    with PodLab(tmp_path_factory.mktemp("adversarial"), prefix=next_prefix()) as lab:
        lab.start_app("b", PY, "-m", "lab.apps", "echo-server", str(ECHO), port=ECHO)
        stream = ["stream-server", str(STREAM), str(STREAM_SECONDS), str(STREAM_RATE)]
        lab.start_app("b", PY, "-m", "lab.apps", *stream, port=STREAM)
        lab.start_app("b", PY, "-m", "lab.apps", "serve", str(SERVE), port=SERVE + 3)
        yield lab


# --------------------------------------------------------------------------- helpers


def status(pid: int, field: str) -> int:
    """A number from /proc/PID/status (VmRSS in kB, Threads)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_kinds(pid: int) -> dict[str, int]:
    """What the fds are (for a failure message): socket, pipe, anon_inode:..., files."""
    kinds: dict[str, int] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        kind = target.split(":", 1)[0] if ":" in target else "file"
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def pid_of(lab: PodLab, pod: str) -> int:
    return lab.sidecars[pod].process.pid


def wait_until(
    what: str, check: Callable[[], bool], timeout: float = 20, why: Callable[[], object] = str
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what} {why()}"
        time.sleep(0.05)


def wait_for_log(lab: PodLab, pod: str, pattern: str, since: int, timeout: float = 15) -> str:
    return pods.wait_for_log(lab, pod, pattern, since, timeout)


def assert_clean(log: str) -> None:
    """Nothing in a sidecar's log that a limit must never cause."""
    assert "Traceback" not in log, log[-4000:]
    assert "internal error" not in log, log[-4000:]


@contextmanager
def sidecars(lab: PodLab, *flags: str, pods: tuple[str, ...] = ("a", "b")) -> Iterator[None]:
    for pod in pods:
        lab.start_sidecar(pod, *flags)
    try:
        yield
    finally:
        for pod in pods:
            if pod in lab.sidecars:
                lab.stop_sidecar(pod)


@contextmanager
def holding(lab: PodLab, pod: str, *argv: str, timeout: float = 120) -> Iterator[dict]:
    """A lab.apps client that opens connections, reports, and holds them until we let go."""
    proc = lab.topology.popen(
        pod, [PY, "-m", "lab.apps", *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        line = proc.stdout.readline()
        assert line, f"{argv} ended without a report (exit {proc.wait(timeout)})"
        yield json.loads(line)
        proc.stdin.close()
        assert json.loads(proc.stdout.readline())["closed"] > 0
        proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def round_trip(lab: PodLab, message: bytes, port: int = ECHO) -> tuple[bytes, str]:
    """A's app -> B's echo app, through both sidecars."""
    return probe(lab.host("a").netns, lab.host("b").ip4, port, message, timeout=10)


def apps(lab: PodLab, pod: str, *argv: str, timeout: float = 300) -> dict:
    out = lab.topology.run(pod, [PY, "-m", "lab.apps", *argv], timeout=timeout)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


# --------------------------------------------------------------------------- (a) flood


def test_flood_of_pending_handshakes_is_bounded_and_others_connect(lab):
    """5,000 ClientHellos from outside that never go on: B holds at most its pending
    limits, its memory stays bounded, A -> B works during the flood, and B's fds go
    back to idle afterwards; no traceback."""
    with sidecars(lab):
        b = pid_of(lab, "b")
        assert round_trip(lab, b"warm")[1] == "eof"  # both sidecars past their first use
        idle_fds, idle_rss = fds(b), status(b, "VmRSS")
        since = len(lab.sidecars["b"].log())
        peak = [idle_rss]
        with holding(lab, "outside", "flood", lab.host("b").ip4, str(ECHO), "5000", "hello") as r:
            peak.append(status(b, "VmRSS"))
            during = round_trip(lab, b"legit during the flood")
            peak.append(status(b, "VmRSS"))
            flood_fds = fds(b)
        assert during == (b"legit during the flood", "eof"), during
        wait_until(
            "B's fds back to idle",
            lambda: fds(b) == idle_fds,
            why=lambda: (idle_fds, fds(b), fd_kinds(b), lab.sidecars["b"].log()[-2000:]),
        )
        after_rss = status(b, "VmRSS")
        log = lab.sidecars["b"].log()[since:]
        print(
            f"flood: {r}; B fds idle {idle_fds} during {flood_fds}; RSS kB idle {idle_rss} "
            f"peak {max(peak)} after {after_rss}"
        )
        assert_clean(log)
        assert "refused at accept" in log and "--max-pending-per-source 64" in log
        # One line per kind per 10 s, however many were refused.
        assert log.count("refused at accept") <= 3, log.count("refused at accept")
        assert flood_fds <= idle_fds + 2 * 64 + 10, flood_fds
        assert max(peak) - idle_rss < 64 * 1024, "more than 64 MB for a bounded flood"
        assert after_rss - idle_rss < 32 * 1024, "memory not given back after the flood"


# --------------------------------------------------------------------------- (b) soak


def test_soak_leaves_no_fds_or_threads_behind(lab):
    """10,000 short connections (with 1,000 idle ones held meanwhile) from A to B through
    both sidecars; afterwards both are back to their idle fd and thread counts."""
    count = 10_000 * SOAK_SCALE
    b_ip = lab.host("b").ip4
    with sidecars(lab):
        pids = {pod: pid_of(lab, pod) for pod in ("a", "b")}
        assert round_trip(lab, b"warm")[1] == "eof"
        before = {p: (fds(pid), status(pid, "Threads")) for p, pid in pids.items()}
        rss0 = {p: status(pid, "VmRSS") for p, pid in pids.items()}
        started = time.monotonic()
        with holding(lab, "a", "idle", b_ip, str(SERVE + 3), "1000") as held:
            assert held["opened"] == 1000
            held_fds = {p: fds(pid) for p, pid in pids.items()}
            rss_idle = {p: status(pid, "VmRSS") for p, pid in pids.items()}
            result = apps(lab, "a", "conncount", b_ip, str(SERVE + 2), str(count), "16")
        took = time.monotonic() - started
        assert result["connections"] == count and result["errors"] == 0, result
        for pod, pid in pids.items():
            wait_until(
                f"{pod}'s fds back to idle", lambda pid=pid, pod=pod: fds(pid) <= before[pod][0]
            )
        after = {p: (fds(pid), status(pid, "Threads")) for p, pid in pids.items()}
        # Reported, not asserted: ~90 MB stay above the start after this soak, and
        # malloc_trim does not return them (see the report of issue 8; open item).
        rss1 = {p: status(pid, "VmRSS") for p, pid in pids.items()}
        per_idle = {p: (rss_idle[p] - rss0[p]) / 1000 for p in pids}
        print(
            f"soak: {count} connections in {result['seconds']:.1f}s ({took:.1f}s with 1000 "
            f"idle); fds/threads before {before} held {held_fds} after {after}; RSS kB "
            f"{rss0} -> with idle {rss_idle} -> after {rss1}; kB per idle connection {per_idle}"
        )
        for pod in pids:
            assert after[pod][0] <= before[pod][0], (pod, before, after)
            assert after[pod][1] <= before[pod][1] + 2, (pod, before, after)  # to_thread workers
            assert_clean(lab.sidecars[pod].log())


# --------------------------------------------------------------------------- (c) inactivity


def test_half_close_is_inactivity_and_idle_connections_are_reset(lab):
    """Finding 7 scaled down: after A's FIN, B's app streams 100 KB/s for 3 s with a
    1 s half-close timeout: all of it arrives.  A silent connection is reset after the
    idle timeout (2 s), logged as such on both sides."""
    flags = ("--half-close-timeout", str(HALF_CLOSE), "--idle-timeout", "2")
    with sidecars(lab, *flags):
        since = {pod: len(lab.sidecars[pod].log()) for pod in ("a", "b")}
        received, end = round_trip(lab, b"please stream", port=STREAM)
        expected = int(STREAM_SECONDS * 10) * (STREAM_RATE // 10)
        assert end == "eof" and len(received) >= expected - STREAM_RATE // 10, (end, len(received))
        line = wait_for_log(lab, "a", r"egress .* outcome=\S+", since["a"])
        assert "outcome=ok" in line, line

        started = time.monotonic()
        silent, end = probe(
            lab.host("a").netns, lab.host("b").ip4, ECHO, b"hi", half_close=False, timeout=10
        )
        took = time.monotonic() - started
        assert (silent, end) == (b"hi", "reset"), (silent, end)
        assert 2.0 <= took <= 2.5 + 1.0, took  # between 1 and 1.25 times the limit, plus slack
        # The first sidecar to time out resets the other, which logs a reset.
        line = wait_for_log(lab, "a", r"egress .*:7001 .* outcome=(timeout|reset)", since["a"])
        other = wait_for_log(lab, "b", r"ingress .*:7001 .* outcome=(timeout|reset)", since["b"])
        assert "idle for more than 2s" in line + other, (line, other)
        for pod in ("a", "b"):
            assert_clean(lab.sidecars[pod].log())


# --------------------------------------------------------------------------- (d) limits


def test_connection_over_max_connections_is_refused_with_one_line(lab):
    """B holds at most 3 connections: three idle ones from A work, the next ones are
    reset at accept (one line for all of them), and the first three still work."""
    with sidecars(lab, "--max-connections", "3", pods=("b",)), sidecars(lab, pods=("a",)):
        since = len(lab.sidecars["b"].log())
        b_ip = lab.host("b").ip4
        with holding(lab, "a", "idle", b_ip, str(SERVE + 3), "3") as held:
            assert held["opened"] == 3
            for _ in range(3):
                assert round_trip(lab, b"one too many")[1] == "reset"
        log = lab.sidecars["b"].log()[since:]
        assert log.count("refused at accept") == 1 and "--max-connections 3" in log, log
        assert round_trip(lab, b"room again") == (b"room again", "eof")
        assert_clean(log)


def test_one_flooding_source_is_held_to_its_pending_quota(lab):
    """Outside opens 300 silent connections to B: 20 stay pending (--max-pending-per-source
    20), the rest are reset at accept; A's connection is from another source and works."""
    with sidecars(lab, "--max-pending-per-source", "20"):
        b = pid_of(lab, "b")
        idle_fds = fds(b)
        since = len(lab.sidecars["b"].log())
        with holding(lab, "outside", "flood", lab.host("b").ip4, str(ECHO), "300", "silent"):
            wait_for_log(lab, "b", r"refused at accept: 20 handshakes pending from", since)
            assert fds(b) <= idle_fds + 20 + 2  # the 20 pending, and A's when it comes
            assert round_trip(lab, b"another source") == (b"another source", "eof")
        wait_until(
            "B's fds back to idle",
            lambda: fds(b) == idle_fds,
            why=lambda: (idle_fds, fds(b), fd_kinds(b), lab.sidecars["b"].log()[-2000:]),
        )
        log = lab.sidecars["b"].log()[since:]
        assert log.count("refused at accept") == 1, log
        assert_clean(log)


# --------------------------------------------------------------------------- (e) fd limit


def test_fd_exhaustion_one_warning_no_traceback_and_recovery(lab):
    """B's open-file limit lowered to 60 while it runs; 200 silent connections from
    outside exhaust it.  One accept warning, no traceback, no internal error; once they
    close, A -> B works again by itself."""
    flags = ("--max-pending-per-source", "1000", "--max-pending-handshakes", "1000")
    with sidecars(lab, *flags):
        b = pid_of(lab, "b")
        assert round_trip(lab, b"before") == (b"before", "eof")
        since = len(lab.sidecars["b"].log())
        limit = fds(b) + 20
        lab.topology.run("node", ["prlimit", "--pid", str(b), f"--nofile={limit}:{limit}"],
                         check=True)  # fmt: skip
        with holding(lab, "outside", "flood", lab.host("b").ip4, str(ECHO), "200", "silent"):
            wait_for_log(lab, "b", r"accept on \S+ paused: EMFILE", since)
            wait_until("B at its fd limit", lambda: fds(b) >= limit - 1)
        log = lab.sidecars["b"].log()[since:]
        # Recovery: the held connections are gone (closed, or timed out in the handshake).
        wait_until("A -> B works again", lambda: round_trip(lab, b"after") == (b"after", "eof"))
        log = lab.sidecars["b"].log()[since:]
        assert log.count("paused: EMFILE") <= 2, log  # one per listener at most, per 10 s
        assert_clean(log)


# --------------------------------------------------------------------------- (f) restart


def test_restart_window_never_gives_plaintext(lab):
    """B's sidecar SIGKILLed and started again while outside probes B's app in a loop:
    every probe is refused (RST) or refused by the TLS listener; none is echoed."""
    results: list[tuple[bytes, str]] = []
    stop = threading.Event()
    marker = f"restart-window-{secrets.token_hex(6)}".encode()

    def prober() -> None:
        while not stop.is_set():
            results.append(probe(lab.host("outside").netns, lab.host("b").ip4, ECHO, marker,
                                 timeout=3))  # fmt: skip

    with sidecars(lab, pods=("b",)):
        thread = threading.Thread(target=prober)
        thread.start()
        try:
            wait_until("probes before the kill", lambda: len(results) >= 20)
            assert lab.stop_sidecar("b", sig=signal.SIGKILL) == -signal.SIGKILL
            killed_at = len(results)
            wait_until("probes while B is down", lambda: len(results) >= killed_at + 20)
            lab.start_sidecar("b", "-v", "0")
            restarted_at = len(results)
            wait_until("probes after the restart", lambda: len(results) >= restarted_at + 20)
        finally:
            stop.set()
            thread.join()
    echoed = [r for r in results if marker in r[0]]
    ends = {end for _, end in results}
    print(f"restart window: {len(results)} probes, ends {sorted(ends)}")
    assert not echoed, f"{len(echoed)} of {len(results)} probes got plaintext"
    assert ends <= {"refused", "reset", "eof"}, ends
    assert "refused" in {end for _, end in results[killed_at:restarted_at]}
    assert spiffe_id("b")  # the lab's identities are in place (sanity)
