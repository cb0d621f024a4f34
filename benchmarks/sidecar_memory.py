"""Memory of the two lab sidecars through a small life: ``python -m benchmarks.sidecar_memory``.

Root, network namespaces (lab.PodLab). Prints /proc/PID/smaps_rollup figures
(Rss, Anonymous, Pss) of both sidecars at each step:

1. started, no traffic (the figure issue 12 calls "idle sidecar");
2. after a few warm-up connections, once the idle trimmer has run;
3. holding ``--idle N`` idle connections A -> B (and KiB per connection);
4. after they close, once the idle trimmer has run ("after load");
5. after ``--burst N`` short connections, likewise;
6. after ``--bulk MIB`` each way on one connection and ``--rr N`` 64-byte
   round trips on another (the benchmark's bulk and ping-pong, small).

Not CPU-sensitive: fine on a busy machine. Sidecar flags after ``--``
(e.g. ``-- --tls-groups X25519:P-256``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lab.netns import next_prefix
from lab.pods import PodLab

from .procstat import smaps_rollup

APP_PORT = 7100  # lab.apps serve: +2 connection rate, +3 idle
#: The idle trimmer looks every 2 s (trio_tproxy.memory.TRIM_CHECK_INTERVAL).
SETTLE = 4.0


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle", type=int, default=500, help="idle connections to hold")
    parser.add_argument("--burst", type=int, default=3000, help="short connections")
    parser.add_argument("--bulk", type=int, default=64, help="MiB each way, one connection")
    parser.add_argument("--rr", type=int, default=2000, help="64-byte round trips")
    parser.add_argument("flags", nargs="*", help="sidecar flags (after --)")
    args = parser.parse_args(argv)
    py = sys.executable
    rows: list[dict[str, object]] = []

    with tempfile.TemporaryDirectory() as work, PodLab(Path(work), prefix=next_prefix()) as lab:

        def step(label: str) -> dict[str, dict[str, int]]:
            figures = {pod: smaps_rollup(s.process.pid) for pod, s in lab.sidecars.items()}
            rows.append({"step": label, **figures})
            print(
                f"{label:34s} "
                + "  ".join(
                    f"{pod}: Rss {f['Rss'] / 1024:5.1f} Anon {f['Anonymous'] / 1024:5.1f} "
                    f"Pss {f['Pss'] / 1024:5.1f} MB"
                    for pod, f in figures.items()
                ),
                flush=True,
            )
            return figures

        def client(*argv: str) -> None:
            out = lab.topology.run("a", [py, "-m", "lab.apps", *argv], timeout=600)
            if out.returncode != 0:
                raise RuntimeError(out.stderr)
            print(f"  {argv[0]}: {out.stdout.strip().splitlines()[-1]}", flush=True)

        for pod in ("a", "b"):
            lab.start_sidecar(pod, "-v", "0", *args.flags)
        lab.start_app("b", py, "-m", "lab.apps", "serve", str(APP_PORT), port=APP_PORT + 3)
        b_ip = lab.host("b").ip4
        time.sleep(SETTLE)
        idle = step("1 started, no traffic")
        client("conncount", b_ip, str(APP_PORT + 2), "20", "4")
        time.sleep(SETTLE)
        step("2 after 20 connections")
        base = {pod: fds(s.process.pid) for pod, s in lab.sidecars.items()}
        holder = lab.topology.popen(
            "a",
            [py, "-m", "lab.apps", "idle", b_ip, str(APP_PORT + 3), str(args.idle)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert holder.stdout is not None and holder.stdin is not None
        opened = json.loads(holder.stdout.readline())["opened"]
        time.sleep(1)
        held = step(f"3 holding {opened} idle connections")
        for pod in held:
            per = (held[pod]["Rss"] - idle[pod]["Rss"]) / opened
            print(f"  {pod}: {per:.1f} KiB Rss per idle connection", flush=True)
        holder.stdin.close()
        holder.wait(60)
        while any(fds(s.process.pid) > base[pod] for pod, s in lab.sidecars.items()):
            time.sleep(0.1)
        time.sleep(SETTLE)
        step("4 after they closed")
        client("conncount", b_ip, str(APP_PORT + 2), str(args.burst), "16")
        time.sleep(SETTLE)
        step(f"5 after {args.burst} short connections")
        client("bulk", b_ip, str(APP_PORT), str(args.bulk))
        client("rr", b_ip, str(APP_PORT + 1), str(args.rr), "64")
        time.sleep(SETTLE)
        after = step(f"6 after bulk {args.bulk} MiB and {args.rr} round trips")
        for pod in after:
            growth = after[pod]["Rss"] / idle[pod]["Rss"] - 1
            print(f"  {pod}: after load {growth:+.0%} of idle", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
