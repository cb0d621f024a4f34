"""``python -m benchmarks``: plaintext vs trio-tproxy vs stunnel vs haproxy, in one run.

Why one command: the figures only mean something side by side, measured on
the same machine, in the same topology, minutes apart. So one run builds the
two-pod namespaces (PodLab), starts the app server in pod B once, and then,
for each repetition, runs every selected set-up in turn: start it, (first
repetition only) prove it does mutual TLS, measure idle memory, ping-pong
latency, connection rates and bulk throughput, stop it. Repetitions are
interleaved so that a slow minute on a shared machine hits every set-up alike.
Leaving the ``with PodLab`` block (normally, on error, Ctrl-C or SIGTERM)
removes every namespace and process.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lab.pods import PodLab, work_directory
from lab.topology import sigterm_unwinds

from . import apps, chart, checks, machine, procstat, pyspy, report, scenarios, speed
from .proxies import ALL, APP_PORT, SERVICES, Proxy, app_port

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULTS = scenarios.Settings(
    bulk_mib=512,
    conn_seconds=3.0,
    rr_count=10_000,
    idle_conns=1000,
    app_seconds=3.0,
    redis_requests=20_000,
)
QUICK = scenarios.Settings(
    bulk_mib=32,
    conn_seconds=1.0,
    rr_count=1000,
    idle_conns=100,
    app_seconds=2.0,
    redis_requests=10_000,
)
DEFAULT_REPEAT = 3
#: Seconds of quiet after the last test before the proxies' RSS is read again.
SETTLE_S = 3.0
#: Above this, a load generator may be what limits the figure (CPU % of one core).
SATURATED_PCT = 90.0
#: Above this, processes outside the benchmark disturbed a test (CPU % of one core).
BUSY_OTHERS_PCT = 15.0
#: --wait-quiet: what counts as a quiet machine (CPU % of one core used by others).
QUIET_PCT = 10.0
#: Inside the pods: reuse TIME_WAIT ports and widen the ephemeral range, or the
#: connection-rate tests run out of ports to the one destination they hammer.
#: Upwards only: below 32768 are the ports trio-tproxy gives the app legs of kept
#: client addresses (proxy.PRESERVE_PORTS); a client picking one of those may
#: collide with them (30000 here timed out 1 idle test in 2).
POD_SYSCTLS = ("net.ipv4.tcp_tw_reuse=1", "net.ipv4.ip_local_port_range=32768 65000")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark plaintext, trio-tproxy, stunnel and haproxy between two "
        "pods in network namespaces (needs root).",
    )
    p.add_argument("--only", default=",".join(ALL), help="comma-separated: " + ", ".join(ALL))
    p.add_argument("--repeat", type=int, help=f"repetitions, medians reported ({DEFAULT_REPEAT})")
    p.add_argument("--bulk-mib", type=int, help=f"MiB each direction ({DEFAULTS.bulk_mib})")
    p.add_argument(
        "--conn-seconds",
        type=float,
        help=f"seconds per connection-rate test ({DEFAULTS.conn_seconds:g})",
    )
    p.add_argument("--rr-count", type=int, help=f"ping-pongs ({DEFAULTS.rr_count})")
    p.add_argument("--idle-conns", type=int, help=f"held connections ({DEFAULTS.idle_conns})")
    p.add_argument(
        "--apps",
        default=",".join(apps.APPS),
        help="real applications to run, comma-separated: " + ", ".join(apps.APPS) + " (all)",
    )
    p.add_argument("--no-apps", action="store_true", help="no real applications")
    p.add_argument(
        "--app-seconds",
        type=float,
        help=f"seconds per wrk and pgbench run ({DEFAULTS.app_seconds:g})",
    )
    p.add_argument(
        "--redis-requests",
        type=int,
        help=f"requests per redis-benchmark test at -P 1, x{apps.REDIS_P16_FACTOR} at -P 16 "
        f"({DEFAULTS.redis_requests})",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {QUICK.bulk_mib} MiB, {QUICK.conn_seconds:g} s, {QUICK.rr_count} "
        f"ping-pongs, {QUICK.idle_conns} idle, apps {QUICK.app_seconds:g} s and "
        f"{QUICK.redis_requests} redis requests, 1 repetition (explicit flags still win)",
    )
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    p.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the trio-tproxy sidecars during bulk (perturbs the figures a little)",
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each set-up, wait up to SECONDS for other processes to use less than "
        f"{QUIET_PCT:g}%% of a core (for shared machines; default 0: do not wait)",
    )
    p.add_argument(
        "--haproxy-threads",
        type=int,
        default=1,
        metavar="N",
        help="haproxy's nbthread (default 1, the match for one trio process; haproxy's own "
        "default is one per core)",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, configs)")
    p.add_argument(
        "--no-resumption",
        action="store_true",
        help="full TLS handshake for every connection, in all three proxies",
    )
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in ALL]
    if unknown or not names:
        p.error(f"--only: unknown {unknown}; choose from {', '.join(ALL)}")
    args.proxies = [n for n in ALL if n in names]
    chosen = [] if args.no_apps else [n.strip() for n in args.apps.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in apps.APPS]
    if unknown:
        p.error(f"--apps: unknown {unknown}; choose from {', '.join(apps.APPS)}")
    args.apps = [n for n in apps.APPS if n in chosen]
    base = QUICK if args.quick else DEFAULTS
    args.settings = scenarios.Settings(
        bulk_mib=args.bulk_mib or base.bulk_mib,
        conn_seconds=args.conn_seconds or base.conn_seconds,
        rr_count=args.rr_count or base.rr_count,
        idle_conns=args.idle_conns or base.idle_conns,
        app_seconds=args.app_seconds or base.app_seconds,
        redis_requests=args.redis_requests or base.redis_requests,
    )
    args.repeat = args.repeat or (1 if args.quick else DEFAULT_REPEAT)
    return args


def missing_prerequisites(proxies: list[str], chosen_apps: Sequence[str] = ()) -> list[str]:
    problems = []
    if os.geteuid() != 0:
        problems.append("needs root: it creates network namespaces and nftables rules")
    tools = [("ip", "iproute2"), ("nft", "nftables"), ("ss", "iproute2")]
    tools += [("openssl", "openssl"), ("sysctl", "procps")]
    if "stunnel" in proxies:
        tools.append(("stunnel4", "stunnel4"))
    if "haproxy" in proxies:
        tools.append(("haproxy", "haproxy"))
    for tool, package in tools:
        if shutil.which(tool) is None:
            problems.append(f"{tool} is not installed (apt-get install {package})")
    return problems + apps.missing(list(chosen_apps))


def _say(text: str) -> None:
    print(text, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problems = missing_prerequisites(args.proxies, args.apps)
    if problems:
        for problem in problems:
            print(f"benchmarks: {problem}", file=sys.stderr)
        return 2
    sigterm_unwinds()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by every process
    stamp = time.strftime("%Y%m%d-%H%M%S")
    started = time.monotonic()
    with work_directory("trio-tproxy-bench-", keep=args.keep) as workdir:
        try:
            with PodLab(workdir) as lab:
                document = run(lab, args, stamp, started)
        except KeyboardInterrupt:
            print("\ninterrupted: namespaces and processes removed", file=sys.stderr)
            return 130
        except scenarios.LoadgenError as exc:
            print(f"benchmarks: {exc}", file=sys.stderr)
            return 1
    finish(document, args, stamp, time.monotonic() - started)
    return 1 if document["warnings"] else 0


def run(lab: PodLab, args: argparse.Namespace, stamp: str, started: float) -> dict[str, Any]:
    s: scenarios.Settings = args.settings
    _say(
        f"benchmarks: {', '.join(args.proxies)}; {args.repeat} repetition(s); bulk "
        f"{s.bulk_mib} MiB each way, connections {s.conn_seconds:g} s per test, "
        f"{s.rr_count} ping-pongs, {s.idle_conns} idle connections; apps: "
        f"{', '.join(args.apps) or 'none'} ({s.app_seconds:g} s, {s.redis_requests} redis "
        f"requests); TLS session resumption {'off' if args.no_resumption else 'on'}"
    )
    others0, t0 = procstat.foreign_cpu_seconds(), time.monotonic()
    _say("openssl speed (1 s each, one core) ...")
    crypto = speed.openssl_speed()
    for pod in ("a", "b"):
        for sysctl in POD_SYSCTLS:
            lab.topology.run(pod, ["sysctl", "-q", "-w", sysctl], check=True)
    server = lab.topology.popen(
        "b",
        [sys.executable, str(scenarios.LOADGEN), "serve", str(APP_PORT)],
        stdout=open(lab.workdir / "app-server.log", "wb"),  # noqa: SIM115 - the child owns it
        stderr=open(lab.workdir / "app-server.err", "wb"),  # noqa: SIM115
    )
    for service in SERVICES:
        lab.topology.wait_port("b", "::", app_port(service), proc=server)

    reps: dict[str, list[dict[str, Any]]] = {name: [] for name in args.proxies}
    mtls: dict[str, dict[str, Any]] = {}
    configurations: dict[str, dict[str, str]] = {}
    notes: dict[str, list[dict[str, str]]] = {name: [] for name in args.proxies}
    if args.apps:
        _say(f"starting {', '.join(args.apps)} in pod B ...")
    with apps.servers(lab, args.apps) as app_servers:
        for rep in range(args.repeat):
            for name in args.proxies:
                proxy = ALL[name](
                    lab, resume=not args.no_resumption, haproxy_threads=args.haproxy_threads
                )
                configurations.setdefault(name, proxy.configuration())
                hook = None
                if args.profile and name == "trio-tproxy":
                    hook = pyspy.recorder(args.out, f"{stamp}-profile-rep{rep + 1}")
                ctx = scenarios.Context(proxy, server.pid, s, around_bulk=hook)
                if args.wait_quiet > 0:
                    wait_for_quiet(args.wait_quiet)
                try:
                    proxy.start()
                    if rep == 0 and proxy.tls:
                        verdict = checks.verify_mtls(proxy)
                        mtls[name] = {"ok": verdict.ok, "summary": verdict.summary}
                        mtls[name]["probes"] = verdict.probes
                        _say(
                            f"  mTLS check {name}: {'OK' if verdict.ok else 'FAILED'}: "
                            f"{verdict.summary}"
                        )
                    app_tests = apps.tests(ctx, app_servers, args.apps)
                    reps[name].append(measure(ctx, f"[{rep + 1}/{args.repeat}] {name}", app_tests))
                finally:
                    proxy.stop()
                notes[name].append(dict(proxy.notes))
                if proxy.notes:
                    _say(f"      {name} sidecars at stop: {proxy.notes}")
    lab.topology.stop(server)
    others = 100 * (procstat.foreign_cpu_seconds() - others0) / (time.monotonic() - t0)
    return {
        "other_processes_cpu_pct": others,
        "timestamp": stamp,
        "command": " ".join(["python -m benchmarks", *(sys.argv[1:])]),
        "settings": {**s.__dict__, "repeat": args.repeat, "quick": args.quick},
        "profiled": args.profile,
        "resumption": not args.no_resumption,
        "proxies": args.proxies,
        "machine": machine.describe(),
        "openssl_speed": crypto,
        "mtls_checks": mtls,
        "configurations": configurations,
        "repetitions": reps,
        "sidecar_notes": notes,
        "medians": {name: report.medians(r) for name, r in reps.items()},
        "counts": {name: report.counts(r) for name, r in reps.items()},
        "loadgen_cpu": {name: report.loadgen_medians(r) for name, r in reps.items()},
        "latency_cdfs": report.cdfs(reps),
        "definitions": DEFINITIONS,
        "topology": {
            "a": lab.host("a").ip4,
            "b": lab.host("b").ip4,
            "pod_sysctls": list(POD_SYSCTLS),
        },
    }


def wait_for_quiet(limit: float) -> None:
    """Wait (at most ``limit`` seconds) for a second in which others use < QUIET_PCT of a core."""
    deadline = time.monotonic() + limit
    while True:
        before = procstat.foreign_cpu_seconds()
        time.sleep(1.0)
        busy = 100 * (procstat.foreign_cpu_seconds() - before)
        if busy < QUIET_PCT:
            return
        if time.monotonic() > deadline:
            _say(f"  machine still busy ({busy:.0f}% of a core used by others): going on")
            return


def measure(
    ctx: scenarios.Context,
    tag: str,
    app_tests: Sequence[tuple[str, Callable[[], dict[str, Any]]]] = (),
) -> dict[str, Any]:
    """All tests of one set-up, idle first (so earlier tests' heap does not hide growth).

    A test that fails (a proxy that cut a connection short, say) is recorded
    under ``failures`` and reported; the other tests still run, and the medians
    use the repetitions that succeeded.
    """
    out: dict[str, Any] = {"loadgen": {}, "failures": {}}
    out.update(scenarios.rss(ctx, "rss_start"))
    tests: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("idle", lambda: scenarios.idle(ctx)),
        ("rr", lambda: scenarios.request_response(ctx)),
        ("conn_seq", lambda: scenarios.connrate(ctx, 1)),
        ("conn_c8", lambda: scenarios.connrate(ctx, scenarios.CONCURRENCY)),
        ("bulk", lambda: scenarios.bulk(ctx)),
        *app_tests,  # the real applications (benchmarks/apps.py)
    ]
    for test, run_test in tests:
        _proxies_idle(ctx)
        try:
            result = run_test()
        except scenarios.LoadgenError as exc:
            out["failures"][test] = str(exc)
            _say(f"  {tag}: {test} FAILED: {exc}")
            continue
        if "loadgen" in result:
            out["loadgen"][test] = result.pop("loadgen")
        out.update(result)
    # What the proxies keep once the load is gone (heap not returned, caches).
    time.sleep(SETTLE_S)
    out.update(scenarios.rss(ctx, "rss_end"))
    _say(f"  {tag}: {_summary(out)}")
    return out


def _proxies_idle(ctx: scenarios.Context, window: float = 0.2, limit: float = 10.0) -> None:
    """Before a test, wait until the proxies finished the last one's work.

    Closing the idle test's 1000 connections took a sidecar about a second of
    CPU after its client had exited, all of it charged to the ping-pong that
    followed (59-66 us in user space per round trip instead of about 20).
    Quiet: under 2% of a core over ``window`` seconds.
    """
    pids = list(ctx.proxy.pids().values())
    deadline = time.monotonic() + limit
    while pids and time.monotonic() < deadline:
        before = procstat.cpu_seconds(pids)
        time.sleep(window)
        if procstat.cpu_seconds(pids) - before < 0.02 * window:
            return


def _summary(r: dict[str, Any]) -> str:
    """One progress line from whatever figures one repetition produced."""
    parts = []
    if "idle_kib_per_conn" in r:
        parts.append(f"idle {r['idle_kib_per_conn']:.1f} KiB/conn")
    if "rr_p50_us" in r:
        parts.append(f"ping-pong p50 {r['rr_p50_us']:.0f} us p99 {r['rr_p99_us']:.0f} us")
    if "conn_seq_per_s" in r and "conn_c8_per_s" in r:
        parts.append(f"conn {r['conn_seq_per_s']:.0f}/s seq, {r['conn_c8_per_s']:.0f}/s c8")
    if "bulk_mbps" in r:
        lg = r["loadgen"]["bulk"]
        proxies = f", proxies {r['bulk_proxy_cpu_pct']:.0f}%" if "bulk_proxy_cpu_pct" in r else ""
        parts.append(
            f"bulk {r['bulk_mbps']:.0f} MB/s (client {lg['client_cpu_pct']:.0f}% / "
            f"server {lg['server_cpu_pct']:.0f}% of a core{proxies})"
        )
    for key, label in (
        ("http_ka", "nginx keep-alive"),
        ("http_close", "nginx close"),
        ("redis_p1", "redis -P 1"),
        ("redis_p16", "redis -P 16"),
        ("pg", "pgbench"),
    ):
        if f"{key}_per_s" in r:
            parts.append(f"{label} {r[f'{key}_per_s']:,.0f}/s p99 {r[f'{key}_p99_us']:,.0f} us")
    if "rss_end_kib" in r:
        parts.append(
            f"RSS A+B {r['rss_start_kib'] / 1024:.1f} -> {r['rss_end_kib'] / 1024:.1f} MiB"
        )
    return "; ".join(parts) or "no figures"


DEFINITIONS = {
    "bulk_mbps": "one connection; the client sends N MiB and half-closes while the server "
    "reads to EOF and sends N MiB back; (2 x N MiB) / wall time from connect to the last "
    "byte, in 10^6 bytes/s",
    "bulk_cpu_s_per_gib": "CPU seconds of the proxies of A and B together (utime+stime, all "
    "threads and children, /proc/<pid>/stat) per GiB moved, both directions counted",
    "conn_*": "short connections: connect, send 100 B, read 100 B, close; sequential or 8 "
    "client threads for a fixed time; latency from connect to the answer; proxy CPU ms per "
    "connection (A+B)",
    "rr_*": "ping-pong of 64 B on one connection (TCP_NODELAY), after 100 warm-up rounds",
    "idle_kib_per_conn": "VmRSS summed over the proxies' processes in A and B, before vs while "
    "holding the connections (each proven by a 1-byte echo), divided by their number",
    "rss_start_kib": "VmRSS of the proxies of A and B (also _a_kib, _b_kib) just after start, "
    "before any traffic",
    "rss_end_kib": f"VmRSS of the proxies after all tests of the repetition, {SETTLE_S:g} s after "
    "the last one ended",
    "rr_cpu_us_per_rt_a": "ping-pong CPU per round trip of A's proxy alone (_b: B's)",
    "rr_user_cpu_us_per_rt": "the user-space part of rr_cpu_us_per_rt (utime; the rest is "
    "stime: system calls and the network stack's work done in the proxies' context)",
    "loadgen_cpu": "client CPU from its getrusage, server CPU from /proc, as % of one core over "
    "the test's wall time",
    "ratios": "value / haproxy's value, whatever the direction; see 'better'",
    "http_ka_*, http_close_*": "nginx (one worker) in B serving a 1 KiB static file; wrk -t1 "
    "-c8 in A for app_seconds, keep-alive or with 'Connection: close' (a new connection per "
    "request); requests/s, latency p50/p99/p99.9 (wrk's histogram), proxy CPU (A+B) us per "
    "request",
    "redis_p1_*, redis_p16_*": "redis-server in B; redis-benchmark -c 8 -t set,get -P 1 or -P 16 "
    "in A (redis_requests per test, x4 at -P 16); requests/s over both tests, latency of GET, "
    "proxy CPU (A+B) us per request over both tests",
    "pg_*": "postgres in B; pgbench -S -c 4 -j 1 -T app_seconds in A (select-only); tps, "
    "latency p50/p99/p99.9 from its per-transaction log, proxy CPU (A+B) us per transaction",
    "*_cdf_us": "latency distribution: [percentile, us] points, drawn in the PNG",
}


APP_KEYS = ("http_ka", "http_close", "redis_p1", "redis_p16", "pg")


def warnings_of(document: dict[str, Any], wall: float) -> list[str]:
    """What makes a figure suspect: say it next to the figures, not only in the JSON."""
    found = []
    for name, check in document["mtls_checks"].items():
        if not check["ok"]:
            found.append(f"{name}: mTLS check failed: {check['summary']}")
    for name in document["proxies"]:
        proxy_cls: type[Proxy] = ALL[name]
        for test, cpu in document["loadgen_cpu"][name].items():
            for side in ("client", "server"):
                pct = cpu[f"{side}_cpu_pct"]
                if proxy_cls.tls and pct > SATURATED_PCT:
                    found.append(
                        f"{name} {test}: load generator {side} used {pct:.0f}% of a core: "
                        "it may be the bottleneck"
                    )
            if cpu["other_cpu_pct"] > BUSY_OTHERS_PCT:
                found.append(
                    f"{name} {test}: other processes on the machine used "
                    f"{cpu['other_cpu_pct']:.0f}% of a core meanwhile: figures disturbed"
                )
        for rep, figures in enumerate(document["repetitions"][name], start=1):
            for test, failure in figures.get("failures", {}).items():
                found.append(f"{name} rep {rep}: {test} failed: {failure}")
        med = document["medians"][name]
        for key in (
            "conn_seq_errors",
            "conn_c8_errors",
            *(f"{app}_errors" for app in APP_KEYS),
        ):
            if med.get(key):
                found.append(f"{name}: {key} = {med[key]:.0f} (median)")
        if proxy_cls.tls and med.get("bulk_cpu_s_per_gib", 1.0) < 0.05:
            found.append(f"{name}: proxies barely used CPU in bulk: did traffic bypass them?")
        for rep_notes in document["sidecar_notes"][name]:
            a_note = rep_notes.get("a", "")
            if name == "trio-tproxy" and "egress/ok" not in a_note:
                found.append(f"trio-tproxy: sidecar A counted no egress connection: {a_note}")
    if wall > 600 and not document["settings"]["quick"]:
        found.append(f"the run took {wall:.0f} s, over the 10-minute budget")
    return found


def finish(document: dict[str, Any], args: argparse.Namespace, stamp: str, wall: float) -> None:
    document["wall_seconds"] = wall
    document["warnings"] = warnings_of(document, wall)
    proxies: list[str] = document["proxies"]
    crypto = document["openssl_speed"]
    _say("")
    _say(
        f"Medians of {args.repeat} repetition(s) ([n] = of n only, the others failed); "
        "(x) = ratio to haproxy. Bulk MB/s counts both directions (10^6 B); proxy CPU and "
        "RSS are A+B."
    )
    _say(report.table(proxies, document["medians"], document["counts"], args.repeat))
    _say("")
    _say(report.loadgen_table(proxies, document["loadgen_cpu"]))
    bulk_proxy = [
        f"{p} {document['medians'][p]['bulk_proxy_cpu_pct']:.0f}%"
        for p in proxies
        if "bulk_proxy_cpu_pct" in document["medians"][p]
    ]
    if bulk_proxy:
        _say(f"proxies' CPU during bulk (A+B, % of one core): {', '.join(bulk_proxy)}")
    if "error" in crypto:
        _say(f"openssl speed failed: {crypto['error']}")
    else:
        _say(
            f"machine crypto limit ({crypto.get('openssl')}, one core): AES-256-GCM "
            f"{crypto.get('aes_256_gcm_mbps', float('nan')):,.0f} MB/s on 16 KiB; ECDSA P-256 "
            f"{crypto.get('ecdsa_p256_sign_per_s', float('nan')):,.0f} sign/s, "
            f"{crypto.get('ecdsa_p256_verify_per_s', float('nan')):,.0f} verify/s"
        )
    _say(
        "processes outside the benchmark used "
        f"{document['other_processes_cpu_pct']:.0f}% of one core on average during the run"
    )
    for name, check in document["mtls_checks"].items():
        _say(f"mTLS {name}: {'OK' if check['ok'] else 'FAILED'}: {check['summary']}")
    if args.profile:
        _say("")
        for raw in sorted(args.out.glob(f"{stamp}-profile-*.txt")):
            _say(f"py-spy own time, top 10 ({raw.name}):")
            for frame, share in pyspy.own_time(raw):
                _say(f"  {share:5.1f}%  {frame}")
    for warning in document["warnings"]:
        _say(f"WARNING: {warning}")
    json_path = args.out / f"{stamp}.json"
    report.write_json(json_path, document)
    _say("")
    _say(f"json: {json_path}")
    title = f"trio-tproxy benchmarks {stamp} ({document['machine']['cpus']} CPUs, medians)"
    _say(
        chart.draw(
            args.out / f"{stamp}.png",
            proxies,
            document["medians"],
            title,
            document.get("latency_cdfs", {}),
        )
    )
    _say(f"wall time: {wall:.0f} s")
