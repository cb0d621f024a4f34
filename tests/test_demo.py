"""The demo proves what it claims: its own checks, read from its output."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest


@pytest.mark.netns
def test_demo_shows_control_protected_and_refused_outsider() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "trio_tproxy", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = run.stdout
    assert run.returncode == 0, out + run.stderr
    wire = re.search(
        r"Wire, sidecars off: marker seen (\d+) times \(control\)\. Sidecars on: \d+ bytes "
        r"captured, (\d+) TLS application-data records, marker seen (\d+) times\.",
        out,
    )
    assert wire, out
    control, records, protected = map(int, wire.groups())
    assert control > 0 and records > 0 and protected == 0
    assert re.search(r"outside \(no sidecar, no certificate\): curl \S+ -> refused", out), out
    assert re.search(r"B's sidecar: ingress \S+ -> \S+ refused: TLS handshake failed", out), out
    assert out.count("(identical)") == 4, out
    assert out.rstrip().splitlines()[-1].startswith("OK: demo took")
