"""The half-close/reset property (fuzz/relay_property.py) over the loopback relay chain.

A bounded campaign runs here; `python -m fuzz.campaign --minutes N` runs long ones.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings

from fuzz.relay_property import run_script, scripts
from lab.chain import contexts, loopback_transport, open_fds
from lab.pki import make_pki

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    files = make_pki(tmp_path_factory.mktemp("pki"))
    return contexts(files["a"]), contexts(files["b"])


@pytest.mark.usefixtures("data_path")
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


def campaign(tmp: Path, *flags: str) -> tuple[list[str], dict[str, str]]:
    """argv and environment of ``python -m fuzz.campaign``, its temporary files in ``tmp``."""
    env = {**os.environ, "TMPDIR": str(tmp)}
    return [sys.executable, "-m", "fuzz.campaign", *flags], env


def test_long_campaign_entry_point_runs_reports_and_cleans_up(tmp_path):
    """`python -m fuzz.campaign` (the long-campaign tool) runs, prints its seed and a count,
    and leaves nothing in the temporary directory (its CA and keys were there)."""
    argv, env = campaign(tmp_path, "--minutes", "0.05", "--seed", "7")
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "seed 7" in out.stdout
    assert re.search(r"passed: [1-9]\d* scripts", out.stdout), out.stdout
    assert list(tmp_path.iterdir()) == []


def test_campaign_ended_by_sigterm_removes_its_keys(tmp_path):
    argv, env = campaign(tmp_path, "--minutes", "5")
    with subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True) as proc:
        try:
            deadline = time.monotonic() + 60
            while not list(tmp_path.glob("tpt-fuzz-*/*.key")):  # the campaign is under way
                assert proc.poll() is None, "the campaign ended before writing its keys"
                assert time.monotonic() < deadline, "the campaign never wrote its keys"
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=60)
        finally:
            proc.kill()  # nothing to do if it has ended; leaving the block reaps it
    assert proc.returncode == 130, out
    assert "stopped by SIGTERM" in out
    assert list(tmp_path.iterdir()) == []
