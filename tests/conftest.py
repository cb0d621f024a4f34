"""Shared pytest plumbing for the kernel-path tests.

Tests marked ``@pytest.mark.netns`` need root, the ``ip``, ``ss`` and ``nft``
tools, and the right to create network namespaces. Where something is
missing they are skipped with a message naming it, except under CI
(``CI=true``), where they fail with that message: a CI machine that silently
skipped the kernel path would report green for code that never ran.

Every namespace made during a session is named under one per-session prefix
(:data:`SESSION_PREFIX`), so that at the end of the session one check proves
that nothing was left behind, however the tests ended. Leftovers are removed
and make the session fail.

Fixtures:

* ``topology``: one shared :class:`~trio_tproxy.topology.Topology` for the
  session. Tests that use it must stop what they start and undo what they
  change (nft tables, routes) before they return.
* ``make_topology``: a factory for private topologies, destroyed at the end
  of the test; for tests that change the kernel state or destroy things.
* ``netns_prefix``: a fresh prefix under the session prefix, for tests that
  drive :class:`Topology` themselves.
"""

from __future__ import annotations

import functools
import itertools
import os
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterable, Iterator

import pytest

from trio_tproxy.topology import DEFAULT_HOSTS, Topology, leftovers

SESSION_PREFIX = f"tpt-{secrets.token_hex(3)}"
_SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
_prefix_numbers = itertools.count(1)


def next_prefix() -> str:
    """A namespace prefix that is unique in this session and covered by the final check."""
    return f"{SESSION_PREFIX}-{next(_prefix_numbers)}"


@functools.cache
def missing_netns_requirements() -> tuple[str, ...]:
    """What the netns tests need and this machine lacks; empty when all is there."""
    missing = []
    if os.geteuid() != 0:
        missing.append(f"root (running as uid {os.geteuid()})")
    tools = {"ip": "iproute2's `ip`", "ss": "iproute2's `ss`", "nft": "nftables' `nft`"}
    for tool, what in tools.items():
        if shutil.which(tool, path=_SBIN_PATH) is None:
            missing.append(f"{what} on PATH or in /usr/sbin")
    if not missing:
        ip = shutil.which("ip", path=_SBIN_PATH)
        assert ip is not None
        probe = f"{SESSION_PREFIX}-probe"
        made = subprocess.run([ip, "netns", "add", probe], capture_output=True, text=True)
        if made.returncode != 0:
            missing.append(f"the right to create network namespaces: {made.stderr.strip()}")
        else:
            subprocess.run([ip, "netns", "delete", probe], check=True)
    return tuple(missing)


def require_root() -> None:
    """Skip the current test if netns tests cannot run here; under CI=true, fail it instead."""
    missing = missing_netns_requirements()
    if not missing:
        return
    message = "network-namespace test needs " + "; ".join(missing)
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} (CI=true: not skipping)", pytrace=False)
    pytest.skip(message)


def pytest_runtest_setup(item: pytest.Item) -> None:
    # Runs before any fixture of the item, including the session-scoped ones.
    if item.get_closest_marker("netns") is not None:
        require_root()


@pytest.fixture(scope="session")
def topology() -> Iterator[Topology]:
    require_root()
    with Topology(prefix=next_prefix()) as topo:
        yield topo


@pytest.fixture
def netns_prefix() -> str:
    return next_prefix()


@pytest.fixture
def make_topology() -> Iterator[Callable[..., Topology]]:
    made: list[Topology] = []

    def make(hosts: Iterable[str] = DEFAULT_HOSTS) -> Topology:
        require_root()
        topo = Topology(prefix=next_prefix(), hosts=hosts)
        made.append(topo)
        return topo.create()

    yield make
    failures = []
    for topo in made:
        try:
            topo.destroy()
        except Exception as exc:
            failures.append(str(exc))
    assert not failures, failures


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    # trylast: after pytest's own sessionfinish has torn down session fixtures.
    left = leftovers(SESSION_PREFIX)
    if not left:
        return
    ip = shutil.which("ip", path=_SBIN_PATH) or "ip"
    for name in left:
        subprocess.run([ip, "netns", "delete", name], check=False)
    message = (
        f"LEAKED NETWORK NAMESPACES: {left} were still present at the end of the session "
        f"(now deleted; any process inside them was not ended). A test or fixture does not "
        f"clean up."
    )
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write("\n")
        reporter.write_line(message, red=True, bold=True)
    else:
        print(message)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
