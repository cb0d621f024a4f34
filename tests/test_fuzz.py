"""The half-close/reset property (fuzz/relay_property.py) over the loopback relay chain.

A bounded campaign runs here; `python -m fuzz.campaign --minutes N` runs long ones.
"""

from __future__ import annotations

import os
from contextlib import asynccontextmanager

import pytest
import trio
from helpers import chain, contexts, is_closed, make_pki, open_fds
from hypothesis import HealthCheck, given, settings

from fuzz.relay_property import run_script, scripts

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    files = make_pki(tmp_path_factory.mktemp("pki"))
    return contexts(files["a"]), contexts(files["b"])


def loopback_transport(a, b):
    @asynccontextmanager
    async def transport():
        async with chain(a, b, half_close_timeout=30) as ch:
            yield ch.client, ch.server
        # The property's last clause: both relays closed both legs.
        assert len(ch.results) == 2, "a relay did not finish within the bound"
        assert all(is_closed(leg) for leg in ch.legs), "a relay leg was left open"

    return transport


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(script=scripts)
def test_relay_chain_keeps_half_close_and_reset(pki, script):
    a, b = pki

    async def main():
        await run_script(script, loopback_transport(a, b))

    before = open_fds()
    trio.run(main)
    assert open_fds() <= before, "file descriptors leaked"


def test_long_campaign_entry_point_runs_and_reports():
    """`python -m fuzz.campaign` (the long-campaign tool) runs, prints its seed and a count."""
    import re
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "fuzz.campaign", "--minutes", "0.05", "--seed", "7"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "seed 7" in out.stdout
    assert re.search(r"passed: [1-9]\d* scripts", out.stdout), out.stdout
