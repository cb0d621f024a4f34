"""Shared pytest plumbing for the kernel-path tests.

Tests marked ``@pytest.mark.netns`` need root, the ``ip``, ``ss`` and ``nft``
tools, and the right to create network namespaces. Where something is
missing they are skipped with a message naming it, except under CI
(``CI=true``), where they fail with that message (the rule is
:func:`lab.require.skip_or_fail`; this file applies it to every ``netns`` test
before any of its fixtures runs).

Every namespace made during a session is named under one per-process prefix
(:data:`lab.netns.RUN_PREFIX`, here :data:`SESSION_PREFIX`), so that at the end
of the session one check proves that nothing was left behind, however the tests
ended. Leftovers are removed and make the session fail.

Fixtures:

* ``topology``: one shared :class:`~lab.topology.Topology` for the
  session. Tests that use it must stop what they start and undo what they
  change (nft tables, routes) before they return.
* ``make_topology``: a factory for private topologies, destroyed at the end
  of the test; for tests that change the kernel state or destroy things.
* ``netns_prefix``: a fresh prefix under the session prefix, for tests that
  drive :class:`Topology` themselves.
* ``data_path``: runs a test three times: established connections in the
  relay thread, per wake-up in compiled code, and in the pure-Python loop
  (``trio_tproxy.fastpath``); the compiled runs fail under CI when the
  extension was not built.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterable, Iterator

import pytest

from lab.netns import RUN_PREFIX, leftovers, next_prefix
from lab.require import require_netns, skip_or_fail
from lab.topology import DEFAULT_HOSTS, Topology
from trio_tproxy import fastpath

SESSION_PREFIX = RUN_PREFIX


def pytest_runtest_setup(item: pytest.Item) -> None:
    # Runs before any fixture of the item, including the session-scoped ones.
    if item.get_closest_marker("netns") is not None:
        require_netns()


@pytest.fixture(scope="session")
def topology() -> Iterator[Topology]:
    require_netns()
    with Topology(prefix=next_prefix()) as topo:
        yield topo


@pytest.fixture(params=["thread", "wakeup", "python"])
def data_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "python":
        monkeypatch.setattr(fastpath, "ENABLED", False)
        return "python"
    if not fastpath.ENABLED:
        skip_or_fail(f"the compiled data path is off: {fastpath.WHY_OFF}")
    if request.param == "thread" and fastpath.MODE != "thread":
        skip_or_fail(f"the relay thread is off: TRIO_TPROXY_FASTPATH={fastpath.MODE}")
    monkeypatch.setattr(fastpath, "THREAD", request.param == "thread")
    if request.param == "thread":
        assert fastpath.relay_thread() is not None  # its fds exist before a test counts them
        # Every connection to the thread at its first wait: short test exchanges
        # would otherwise end before a promotion (test_relay tests that one).
        monkeypatch.setattr(fastpath, "PROMOTE_AFTER", 0)
    return str(request.param)


@pytest.fixture
def netns_prefix() -> str:
    return next_prefix()


@pytest.fixture
def make_topology() -> Iterator[Callable[..., Topology]]:
    made: list[Topology] = []

    def make(hosts: Iterable[str] = DEFAULT_HOSTS) -> Topology:
        require_netns()
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
    ip = shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin") or "ip"
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
