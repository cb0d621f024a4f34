"""Interleaved A/B: client-IP preservation on vs off, connection rate and CPU per connection.

    python -m benchmarks.preserve_ab [--rounds 3] [--seconds 3] [--concurrency 8]

Two pods with sidecars (lab.pods.PodLab, real nft/TPROXY); pod B's sidecar
is restarted with ``--preserve-client-ip=true`` and ``=false`` in turn
(on, off, off, on, on, off, ...: each pair alternates who goes first, so a
drift in the machine's load hits both alike).  Each run is lab/apps.py
``connrate`` from A to B's connection-rate port (100 B each way, then
close) for ``--seconds``; the CPU of both sidecars (and of B's alone, where
the change lives) is read from /proc over the run.  Prints one line per run
and the medians per setting.  Needs root; uses the same lab as the main
benchmark, none of its reporting.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from lab.netns import next_prefix
from lab.pods import PodLab, work_directory

from . import procstat
from .scenarios import LOADGEN

APP_PORT = 9000
CONN_PORT = APP_PORT + 2  # lab/apps.py serve: the connection-rate listener
SIDECAR_FLAGS = ("-v", "0", "--route-check-interval", "5")


def run_once(lab: PodLab, preserve: bool, seconds: float, concurrency: int) -> dict[str, float]:
    if "b" in lab.sidecars:
        lab.stop_sidecar("b")
    lab.start_sidecar("b", *SIDECAR_FLAGS, f"--preserve-client-ip={str(preserve).lower()}")
    pids = {pod: lab.sidecars[pod].process.pid for pod in ("a", "b")}
    both0, b0 = procstat.cpu_seconds(pids.values()), procstat.cpu_seconds([pids["b"]])
    out = lab.topology.run(
        "a",
        [
            sys.executable,
            str(LOADGEN),
            "connrate",
            lab.host("b").ip4,
            str(CONN_PORT),
            str(seconds),
            str(concurrency),
        ],
        timeout=seconds + 120,
        check=True,
    )
    both = procstat.cpu_seconds(pids.values()) - both0
    b_cpu = procstat.cpu_seconds([pids["b"]]) - b0
    result = json.loads(out.stdout)
    n = result["connections"]
    return {
        "conn_per_s": n / result["seconds"],
        "cpu_ms_per_conn_both": 1000 * both / n,
        "cpu_ms_per_conn_b": 1000 * b_cpu / n,
        "errors": result["errors"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.preserve_ab")
    parser.add_argument("--rounds", type=int, default=3, help="pairs of runs (3)")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per run (3)")
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args(argv)
    results: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    with (
        work_directory("tpt-ab-") as workdir,
        PodLab(workdir, prefix=next_prefix()) as lab,
    ):
        lab.start_sidecar("a", *SIDECAR_FLAGS)
        lab.start_app("b", sys.executable, str(LOADGEN), "serve", str(APP_PORT), port=CONN_PORT)
        run_once(lab, True, 1.0, args.concurrency)  # warm-up, not counted
        for i in range(args.rounds):
            order = (True, False) if i % 2 == 0 else (False, True)
            for preserve in order:
                r = run_once(lab, preserve, args.seconds, args.concurrency)
                results[preserve].append(r)
                print(
                    f"round {i + 1} preserve={'on ' if preserve else 'off'} "
                    f"{r['conn_per_s']:8.1f} conn/s  "
                    f"{r['cpu_ms_per_conn_both']:.3f} ms CPU/conn (both sidecars)  "
                    f"{r['cpu_ms_per_conn_b']:.3f} ms (B)  errors {r['errors']:.0f}",
                    flush=True,
                )
    for preserve in (True, False):
        rs = results[preserve]
        print(
            f"median preserve={'on ' if preserve else 'off'}: "
            f"{statistics.median(r['conn_per_s'] for r in rs):8.1f} conn/s  "
            f"{statistics.median(r['cpu_ms_per_conn_both'] for r in rs):.3f} ms CPU/conn (both)  "
            f"{statistics.median(r['cpu_ms_per_conn_b'] for r in rs):.3f} ms (B)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
