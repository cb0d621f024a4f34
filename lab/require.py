"""The one rule for a test that needs what this machine may lack: skip it, except under CI.

On a developer's machine a test that cannot run here (no root, no ``nft``, no
IPv6 ...) is skipped with a message naming what is missing. Under CI
(``CI=true``) it fails with that message instead: a CI machine that silently
skipped the kernel path would report green for code that never ran. Every such
decision in the tests goes through :func:`skip_or_fail`; tests/conftest.py
applies :func:`require_netns` to every test marked ``netns``.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from typing import NoReturn

import pytest

from .netns import RUN_PREFIX

__all__ = ["missing_for_netns", "require_netns", "skip_or_fail", "under_ci"]

_SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
_TOOLS = {"ip": "iproute2's `ip`", "ss": "iproute2's `ss`", "nft": "nftables' `nft`"}


def under_ci() -> bool:
    return os.environ.get("CI") == "true"


def skip_or_fail(reason: str) -> NoReturn:
    """Skip the current test because of ``reason``; under CI=true, fail it instead."""
    if under_ci():
        pytest.fail(f"{reason} (CI=true: not skipping)", pytrace=False)
    pytest.skip(reason)


@functools.cache
def missing_for_netns() -> tuple[str, ...]:
    """What the kernel-path tests need and this machine lacks; empty when all is there.

    Root, ``ip``/``ss``/``nft``, and the right to create a network namespace
    (tried once, with a probe named under the run's prefix).
    """
    missing = []
    if os.geteuid() != 0:
        missing.append(f"root (running as uid {os.geteuid()})")
    for tool, what in _TOOLS.items():
        if shutil.which(tool, path=_SBIN_PATH) is None:
            missing.append(f"{what} on PATH or in /usr/sbin")
    if not missing:
        ip = shutil.which("ip", path=_SBIN_PATH)
        assert ip is not None
        probe = f"{RUN_PREFIX}-probe"
        made = subprocess.run([ip, "netns", "add", probe], capture_output=True, text=True)
        if made.returncode != 0:
            missing.append(f"the right to create network namespaces: {made.stderr.strip()}")
        else:
            subprocess.run([ip, "netns", "delete", probe], check=True)
    return tuple(missing)


def require_netns() -> None:
    """Skip (under CI=true: fail) the current test if kernel-path tests cannot run here."""
    missing = missing_for_netns()
    if missing:
        skip_or_fail("network-namespace test needs " + "; ".join(missing))
