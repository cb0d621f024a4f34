"""``--profile``: py-spy on the trio-tproxy sidecars during the bulk test.

Why: the figures say how fast; a profile says where the time goes. py-spy
samples from outside the process (no code change, small overhead, but not
zero: profiled runs are marked in the JSON and should not be compared with
unprofiled ones). Raw output is one collapsed stack per line ending in a
sample count; a function's "own" time is the samples where it is the leaf.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

RATE = 250  # samples per second
_LINE = re.compile(r":\d+\)$")


def py_spy() -> str | None:
    return shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))


def recorder(out_dir: Path, tag: str) -> Callable[[dict[str, int]], Callable[[], None]]:
    """A hook for the bulk test: start py-spy on each pod's proxy, return what stops them.

    The raw files are ``<out_dir>/<tag>-<pod>.txt``.
    """

    def start(pids: dict[str, int]) -> Callable[[], None]:
        exe = py_spy()
        if exe is None:
            print("profile: py-spy not found (pip install py-spy)", file=sys.stderr)
            return lambda: None
        out_dir.mkdir(parents=True, exist_ok=True)
        procs = []
        for pod, pid in pids.items():
            raw = out_dir / f"{tag}-{pod}.txt"
            procs.append(
                subprocess.Popen(
                    [exe, "record", "--pid", str(pid), "--rate", str(RATE), "--format", "raw"]
                    + ["--nonblocking", "--output", str(raw)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )

        def stop() -> None:
            for proc in procs:
                proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            for proc in procs:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

        return stop

    return start


def own_time(raw: Path, top: int = 10) -> list[tuple[str, float]]:
    """The ``top`` leaf functions of a py-spy raw file, with their share of samples in %.

    Frames are ``function (file:line)``; the line is dropped so that a function's
    lines add up. Without ``--native`` the leaf is the Python frame that called
    into C, so a function's own time includes the C code it calls (OpenSSL's
    encryption in ``Connection.send``, the syscall in a socket method).
    """
    leaves: Counter[str] = Counter()
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        leaves[_LINE.sub(")", stack.split(";")[-1])] += int(count)
    total = sum(leaves.values()) or 1
    return [(frame, 100 * n / total) for frame, n in leaves.most_common(top)]
