"""UDP through the sidecars (DTLS 1.2) vs plaintext: round-trip latency and packets per second.

    sudo .venv/bin/python -m benchmarks.udp [--count N] [--size BYTES] [--repeat R]

Not a scenario of ``python -m benchmarks``: that harness compares TCP
set-ups (stunnel, haproxy) that carry no UDP. This script builds the same
two-pod lab (lab.pods.PodLab), starts ``trio-tproxy run --intercept-udp`` in
both pods and ``lab/apps.py udp-echo-server`` in B, then runs ``udp-rr`` in A
twice per repetition: to B's cluster address (intercepted: app -> sidecar A
-> DTLS -> sidecar B -> app, and back) and to B's address outside the
cluster ranges (not intercepted by A; B's sidecar lets the echo port through
with ``--exclude-udp-port``: plaintext, same sockets, same bridge). It
prints the medians and the ratios (sidecars / plaintext) and writes them as
JSON to ``benchmarks/results/udp-<timestamp>.json``.

``udp-rr`` measures one datagram in flight (latency: p50, p99), then keeps
32 in flight (packets per second, each way). Loss is reported, not retried.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lab.netns import next_prefix
from lab.pods import PodLab

ECHO = 7300
RESULTS = Path(__file__).parent / "results"


def _rr(lab: PodLab, host: str, count: int, size: int) -> dict[str, Any]:
    out = lab.topology.run(
        "a",
        [sys.executable, "-m", "lab.apps", "udp-rr", host, str(ECHO), str(count), str(size)],
        timeout=600,
    )
    if out.returncode != 0:
        raise RuntimeError(f"udp-rr to {host} failed: {out.stderr.strip()}")
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.udp", description=__doc__)
    parser.add_argument("--count", type=int, default=5000, help="datagrams per phase")
    parser.add_argument("--size", type=int, default=64, help="bytes per datagram")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    runs: dict[str, list[dict[str, Any]]] = {"dtls": [], "plaintext": []}
    with (
        tempfile.TemporaryDirectory(prefix="tpt-udp-bench-") as work,
        PodLab(Path(work), prefix=next_prefix()) as lab,
    ):
        lab.start_sidecar("a", "-v", "0", "--intercept-udp")
        # B's sidecar refuses plaintext UDP on every port but the excluded ones:
        # the plaintext baseline reaches the same server through that exclusion.
        lab.start_sidecar("b", "-v", "0", "--intercept-udp", "--exclude-udp-port", str(ECHO))
        lab.start_app(
            "b",
            sys.executable,
            "-m",
            "lab.apps",
            "udp-echo-server",
            str(ECHO),
            port=ECHO,
            protocol="udp",
        )
        b = lab.host("b")
        _rr(lab, b.ip4, 200, args.size)  # warm-up: the handshake, caches
        for _ in range(args.repeat):
            runs["dtls"].append(_rr(lab, b.ip4, args.count, args.size))
            runs["plaintext"].append(_rr(lab, b.ip4_plain, args.count, args.size))
    medians = {
        name: {
            key: statistics.median(r[key] for r in results)
            for key in ("p50_us", "p99_us", "pps", "lost", "pps_lost")
        }
        for name, results in runs.items()
    }
    d, p = medians["dtls"], medians["plaintext"]
    ratios = {
        "p50": d["p50_us"] / p["p50_us"],
        "p99": d["p99_us"] / p["p99_us"],
        "pps": d["pps"] / p["pps"],
    }
    print(f"UDP echo, {args.size} B datagrams, {args.count} per phase, median of {args.repeat}")
    print(f"{'':12} {'p50 us':>9} {'p99 us':>9} {'pps':>9} {'lost':>5}")
    for name, m in medians.items():
        lost = m["lost"] + m["pps_lost"]
        print(f"{name:12} {m['p50_us']:9.0f} {m['p99_us']:9.0f} {m['pps']:9.0f} {lost:5.0f}")
    print(
        f"ratio (sidecars / plaintext): p50 {ratios['p50']:.2f}x, p99 {ratios['p99']:.2f}x, "
        f"pps {ratios['pps']:.2f}x"
    )
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"udp-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(
        json.dumps(
            {"args": vars(args), "runs": runs, "medians": medians, "ratios": ratios}, indent=2
        )
    )
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
