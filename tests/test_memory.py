"""Memory: the idle trimmer's policy, glibc's calls, and what the sidecar does not import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import trio
import trio.testing

from benchmarks.procstat import smaps_rollup
from lab.netns import next_prefix
from lab.pods import PodLab
from trio_tproxy import memory

#: Idle RSS of a started sidecar on the project's machines (Python 3.11, glibc):
#: 57 MB with pyroute2, 42-43 MB without it and with the trim after start-up.
#: The bound leaves room for other Python builds; issue 12's target is 30 MB.
IDLE_RSS_LIMIT_KB = 48 * 1024


def test_trim_and_arena_cap_talk_to_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    if memory._libc is None:
        pytest.skip("not glibc: both calls are documented no-ops")
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert memory.limit_arenas() is True
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert memory.limit_arenas() is False  # the operator's setting wins
    # Free a few large blocks, then trim: returns whether anything went back.
    blocks = [bytearray(300_000) for _ in range(20)]
    del blocks
    assert isinstance(memory.trim(), bool)


def test_trims_once_per_busy_period_and_only_when_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    trims: list[float] = []
    state = {"active": 0, "ended": 0}
    monkeypatch.setattr(memory, "trim", lambda: trims.append(trio.current_time()) or True)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                memory.trim_when_idle, lambda: state["active"], lambda: state["ended"]
            )
            await trio.sleep(10)
            assert trims == []  # nothing happened yet: never trimmed
            state["active"], state["ended"] = 3, 5
            await trio.sleep(10)
            assert trims == []  # busy: connections still open
            state["active"] = 0
            await trio.sleep(memory.TRIM_CHECK_INTERVAL + 0.1)
            assert len(trims) == 1  # idle after a busy period: one trim
            await trio.sleep(30)
            assert len(trims) == 1  # still idle, nothing new: not again
            state["ended"] = 6
            await trio.sleep(memory.TRIM_CHECK_INTERVAL + 0.1)
            assert len(trims) == 2
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_sidecar_start_does_not_import_what_it_may_never_need() -> None:
    """prometheus_client on the first scrape, h2 on the first gRPC probe, never the lab/YAML."""
    code = (
        "import sys, trio_tproxy.cli as c, trio_tproxy.lifecycle; c.build_parser(); "
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    loaded = set(
        subprocess.run(
            [sys.executable, "-c", code], check=True, capture_output=True, text=True
        ).stdout.split()
    )
    assert {"trio", "OpenSSL"} <= loaded  # the probe itself works
    assert not loaded & {"prometheus_client", "h2", "hpack", "hyperframe", "yaml", "lab"}
    # pyroute2 (~12 MB of RSS, ~235 modules): trio_tproxy.rtnl does the rtnetlink;
    # test tools never leak into the sidecar
    assert not loaded & {"pyroute2", "pytest", "_pytest", "hypothesis"}


@pytest.mark.netns
def test_idle_sidecar_rss(tmp_path: Path) -> None:
    """A sidecar that has started (rules installed, admin and probe servers up) and
    carried no traffic stays under IDLE_RSS_LIMIT_KB."""
    with PodLab(tmp_path, prefix=next_prefix()) as lab:
        sidecar = lab.start_sidecar("a")  # returns once "ready:" is logged
        fields = smaps_rollup(sidecar.process.pid)
    print(f"idle sidecar: {fields}")
    assert fields["Rss"] < IDLE_RSS_LIMIT_KB, fields
