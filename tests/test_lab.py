"""The test lab (lab/): it stays out of the sidecar, and its skip-or-fail rule holds.

``trio-tproxy run`` must import nothing of the lab (no namespace code, no
``atexit`` hook, no SIGTERM handler of the lab's in the production process), and
``trio-tproxy demo`` must say where the demo lives when the lab is not
installed, as in the container image. A test that cannot run here skips, except
under CI=true, where it fails.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from lab.netns import RUN_PREFIX, leftovers, scratch_netns
from lab.require import skip_or_fail
from trio_tproxy import cli


def test_run_imports_nothing_of_the_lab() -> None:
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "trio_tproxy", "run", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    # "import time: self | cumulative | <indent>module"
    modules = [m.group(1) for m in re.finditer(r"^import time:.*\|\s*(\S+)$", out.stderr, re.M)]
    assert "trio_tproxy.cli" in modules  # the parse is right
    assert [m for m in modules if m.split(".")[0] == "lab"] == []


def test_building_the_parser_leaves_sigterm_and_modules_alone() -> None:
    probe = (
        "import signal, sys\n"
        "from trio_tproxy import cli\n"
        "cli.build_parser()\n"
        "print(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL,"
        " [m for m in sys.modules if m.split('.')[0] == 'lab'])\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.stdout == "True []\n", out.stdout + out.stderr


def test_demo_without_the_lab_says_where_it_lives(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # None in sys.modules makes `import lab` fail as if it were not installed.
    monkeypatch.setitem(sys.modules, "lab", None)
    assert cli.main(["demo"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "trio-tproxy demo: the demo ships with the source tree: "
        "run `bash dev.sh demo` from a clone of the repository"
    ]


@pytest.mark.parametrize(
    ("ci", "outcome"), [("true", pytest.fail.Exception), (None, pytest.skip.Exception)]
)
def test_skip_or_fail_skips_except_under_ci(
    monkeypatch: pytest.MonkeyPatch, ci: str | None, outcome: type[BaseException]
) -> None:
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    # Caught as BaseException: a wrong outcome must fail this test, not skip it.
    with pytest.raises(BaseException, match="no frobnicator here") as info:
        skip_or_fail("no frobnicator here")
    assert info.type is outcome


@pytest.mark.netns
def test_scratch_netns_is_under_the_session_prefix_and_removed() -> None:
    """So that the session's final leak check (tests/conftest.py) covers it."""
    with scratch_netns() as name:
        assert name.startswith(f"{RUN_PREFIX}-")
        assert leftovers(name) == [name]
    assert leftovers(name) == []
