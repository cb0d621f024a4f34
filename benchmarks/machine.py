"""What the figures were measured on: machine, versions, source revision.

Why: a number without its machine and versions cannot be compared with the
next run's. Everything here is read-only (``git`` is only asked, never told).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def _first_line(argv: list[str]) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, cwd=REPO)
    except (OSError, subprocess.SubprocessError):
        return None
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _pyopenssl_openssl() -> str | None:
    try:
        from OpenSSL import SSL

        return SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()
    except ImportError:
        return None


def describe() -> dict[str, Any]:
    stunnel = _first_line(["stunnel4", "-version"])
    if stunnel and "inetd" in stunnel:  # stunnel prints a notice line first
        done = subprocess.run(["stunnel4", "-version"], capture_output=True, text=True)
        stunnel = next((ln for ln in done.stderr.splitlines() if ln.startswith("stunnel ")), None)
    status = _first_line(["git", "status", "--porcelain", "--untracked-files=no"])
    return {
        "kernel": platform.release(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "pyopenssl_openssl": _pyopenssl_openssl(),
        "system_openssl": _first_line(["openssl", "version"]),
        "haproxy": _first_line(["haproxy", "-v"]),
        "stunnel": stunnel,
        "git_commit": _first_line(["git", "rev-parse", "HEAD"]),
        "git_dirty": status is not None,
    }
