"""Long fuzz campaigns of the half-close/reset property.

    python -m fuzz.campaign --minutes 30            # loopback relay chain
    python -m fuzz.campaign --minutes 30 --kernel   # through nftables/TPROXY in netns (root)

Prints the seed; a failing script is saved under fuzz/failures/ and replayed
with ``--replay FILE``. The throwaway certificates and keys (and, with
``--kernel``, the pods' namespaces) are removed when the campaign ends, also on
Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import trio
from hypothesis import HealthCheck, given, seed, settings

from fuzz.relay_property import run_script, scripts
from lab.chain import Transport, contexts, loopback_transport
from lab.pki import make_pki
from lab.pods import Pods
from lab.topology import sigterm_sets

FAILURES = Path(__file__).parent / "failures"
#: Set by SIGTERM: the campaign stops after the script under way and cleans up.
TERMINATED = threading.Event()


def _loopback_transport(workdir: Path) -> Transport:
    """The loopback relay chain, with its throwaway PKI in ``workdir``."""
    files = make_pki(workdir)
    return loopback_transport(contexts(files["a"]), contexts(files["b"]))


def _round(round_seed: int, transport: Transport, counter: list[int]):  # type: ignore[no-untyped-def]
    """One hypothesis run of 50 scripts; a failing script is saved for --replay."""

    @seed(round_seed)
    @settings(
        max_examples=50, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(script=scripts)
    def prop(script):  # type: ignore[no-untyped-def]
        if TERMINATED.is_set():
            return  # SIGTERM: let the round finish at once
        counter[0] += 1
        try:
            trio.run(run_script, script, transport)
        except KeyboardInterrupt:
            raise  # Ctrl-C or SIGTERM, not a failing script
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
    # Everything the campaign writes (private keys included) lives in these and is
    # removed however the campaign ends: Ctrl-C unwinds, SIGTERM stops it after the
    # current script; the pods remove their own work directory and namespaces.
    sigterm_sets(TERMINATED)
    try:
        with contextlib.ExitStack() as cleanup:
            if args.kernel:
                pods = Pods.start()
                cleanup.callback(pods.stop)
                transport = pods.transport
            else:
                workdir = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="tpt-fuzz-"))
                transport = _loopback_transport(Path(workdir))
            return _campaign(args, the_seed, transport)
    except KeyboardInterrupt:
        print("interrupted: everything was cleaned up", flush=True)
        return 130


def _campaign(args: argparse.Namespace, the_seed: int, transport: Transport) -> int:
    if args.replay:
        script = [tuple(a) for a in json.loads(args.replay.read_text())]
        trio.run(run_script, script, transport)
        print("replay passed")
        return 0
    deadline = time.monotonic() + args.minutes * 60
    counter = [0]
    rounds = 0
    # Rounds of 50 examples, each seeded from the campaign seed, until time is up.
    while time.monotonic() < deadline and not TERMINATED.is_set():
        round_seed = the_seed + rounds
        rounds += 1
        try:
            _round(round_seed, transport, counter)()
        except Exception as exc:
            print(f"FAILED after {counter[0]} scripts (round seed {round_seed}): {exc!r}")
            return 1
    if TERMINATED.is_set():
        print(f"stopped by SIGTERM after {counter[0]} scripts (seed {the_seed})", flush=True)
        return 130
    print(f"passed: {counter[0]} scripts in {args.minutes:g} min (seed {the_seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
