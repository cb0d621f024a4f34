"""Long fuzz campaigns of the half-close/reset property.

    python -m fuzz.campaign --minutes 30            # loopback relay chain
    python -m fuzz.campaign --minutes 30 --kernel   # through nftables/TPROXY in netns (root)

Prints the seed; a failing script is saved under fuzz/failures/ and replayed
with ``--replay FILE``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import trio
from hypothesis import HealthCheck, given, seed, settings

from fuzz.relay_property import run_script, scripts

FAILURES = Path(__file__).parent / "failures"


def _loopback_transport():  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
    from helpers import contexts, make_pki
    from test_fuzz import loopback_transport

    files = make_pki(Path(tempfile.mkdtemp(prefix="tpt-fuzz-")))
    return loopback_transport(contexts(files["a"]), contexts(files["b"])), None


def _kernel_transport():  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
    from netns_pods import Pods

    pods = Pods.start()
    return pods.transport, pods


def _round(round_seed: int, transport, counter: list[int]):  # type: ignore[no-untyped-def]
    """One hypothesis run of 50 scripts; a failing script is saved for --replay."""

    @seed(round_seed)
    @settings(
        max_examples=50, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(script=scripts)
    def prop(script):  # type: ignore[no-untyped-def]
        counter[0] += 1
        try:
            trio.run(run_script, script, transport)
        except BaseException:
            FAILURES.mkdir(exist_ok=True)
            path = FAILURES / f"seed{round_seed}-{os.getpid()}.json"
            path.write_text(json.dumps(script))
            print(f"failing script saved to {path} (replay with --replay)", flush=True)
            raise

    return prop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz.campaign")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--kernel",
        action="store_true",
        help="through the real kernel path in network namespaces (root)",
    )
    parser.add_argument("--replay", type=Path, help="run one saved failing script")
    args = parser.parse_args(argv)
    the_seed = args.seed if args.seed is not None else random.randrange(2**32)
    print(
        f"fuzz campaign: seed {the_seed}, {args.minutes:g} min, "
        f"{'kernel path' if args.kernel else 'loopback chain'}",
        flush=True,
    )
    transport, owner = _kernel_transport() if args.kernel else _loopback_transport()
    try:
        if args.replay:
            script = [tuple(a) for a in json.loads(args.replay.read_text())]
            trio.run(run_script, script, transport)
            print("replay passed")
            return 0
        deadline = time.monotonic() + args.minutes * 60
        counter = [0]
        rounds = 0
        # Rounds of 50 examples, each seeded from the campaign seed, until time is up.
        while time.monotonic() < deadline:
            round_seed = the_seed + rounds
            rounds += 1
            try:
                _round(round_seed, transport, counter)()
            except Exception as exc:
                print(f"FAILED after {counter[0]} scripts (round seed {round_seed}): {exc!r}")
                return 1
        print(f"passed: {counter[0]} scripts in {args.minutes:g} min (seed {the_seed})")
        return 0
    finally:
        if owner is not None:
            owner.stop()


if __name__ == "__main__":
    sys.exit(main())
