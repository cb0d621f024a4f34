"""The measurements: each runs one load generator in pod A against the app in pod B.

Why they all go through :func:`_measured`: every figure must come with the
proxies' CPU over exactly the same interval, and with the load generators' own
CPU, so that a reader can tell a slow proxy from a saturated client. The
client reports its CPU itself (getrusage); the app server's is read from /proc
like the proxies'.

Figures (see the README for the definitions):

* bulk: MB/s = bytes of both directions / wall time of the whole exchange
  (connect to the last byte received), 1 MB = 10^6 bytes; proxy CPU seconds
  per GiB moved (both directions counted).
* connection rate: connections per second, latency p50/p99 (connect to the
  100-byte answer), proxy CPU ms per connection; sequential and 8 at a time.
* request/response: 64-byte ping-pong latency on one connection, and the
  proxies' CPU per round trip (is the latency CPU, or waiting?).
* idle: proxy RSS growth per held connection.
"""

from __future__ import annotations

import json
import resource
import select
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab import apps

from . import procstat
from .proxies import Proxy

#: The load generators and app server (lab/apps.py), run by path: no package import at start.
LOADGEN = Path(apps.__file__)
RR_SIZE = 64
RR_WARMUP = 100  # round trips lab/apps.py makes before it starts timing
CONCURRENCY = 8
Result = dict[str, Any]


@dataclass(frozen=True)
class Settings:
    bulk_mib: int
    conn_seconds: float
    rr_count: int
    idle_conns: int
    #: seconds per wrk / pgbench run (the app scenarios, benchmarks/apps.py)
    app_seconds: float = 3.0
    #: requests per redis-benchmark test at -P 1 (x4 at -P 16)
    redis_requests: int = 20_000


@dataclass
class Context:
    proxy: Proxy
    server_pid: int
    settings: Settings
    #: Called around the bulk test with the proxy PIDs by pod (the optional profiler).
    around_bulk: Callable[[dict[str, int]], Callable[[], None]] | None = None


class LoadgenError(RuntimeError):
    """A load generator failed: the figure would be meaningless."""


def _client(*args: object) -> list[str]:
    return [sys.executable, str(LOADGEN), *map(str, args)]


@dataclass(frozen=True)
class Measured:
    """A client's JSON and the CPU seconds others spent while it ran."""

    out: Result
    proxy_cpu: float
    #: the same, per pod ("a": client side, "b": server side)
    proxy_cpu_by_pod: dict[str, float]
    server_cpu: float
    #: processes outside the benchmark (a shared machine): CPU the test did not get
    other_cpu: float
    #: seconds from starting the client to its exit (its own figure excludes start-up)
    wall: float
    #: the proxies' CPU in user space (A+B)
    proxy_user_cpu: float = 0.0

    def loadgen(self) -> Result:
        """Client and app server CPU over the client's timed part, foreign CPU over the
        whole run of the client; all in % of one core."""
        seconds = self.out["seconds"]
        return {
            "client_cpu_pct": 100 * self.out["cpu_seconds"] / seconds,
            "server_cpu_pct": 100 * self.server_cpu / seconds,
            "other_cpu_pct": 100 * self.other_cpu / self.wall,
        }


@dataclass(frozen=True)
class ClientRun:
    """A client's output, its own CPU, and the CPU seconds others spent while it ran."""

    stdout: str
    proxy_cpu_by_pod: dict[str, float]
    server_cpu: float
    other_cpu: float
    wall: float
    #: the client's CPU from getrusage(RUSAGE_CHILDREN): `ip netns exec` execs in place,
    #: so the reaped child is the client itself (for tools that do not report their own)
    client_cpu: float
    #: the proxies' CPU spent in user space (A+B); the rest of their CPU is the kernel's
    proxy_user_cpu: float = 0.0


def run_client(ctx: Context, argv: list[str], timeout: float) -> ClientRun:
    """Run a client in pod A, with the CPU of the proxies, the server and strangers meanwhile."""
    topo = ctx.proxy.lab.topology
    by_pod = ctx.proxy.pids()
    pod0 = {pod: procstat.cpu_seconds([pid]) for pod, pid in by_pod.items()}
    user0 = procstat.user_cpu_seconds(by_pod.values())
    server0 = procstat.cpu_seconds([ctx.server_pid])
    children0 = _children_cpu()
    other0, t0 = procstat.foreign_cpu_seconds(), time.monotonic()
    try:
        done = topo.run("a", argv, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise LoadgenError(f"{ctx.proxy.name}: {' '.join(argv[2:])} timed out") from None
    wall = time.monotonic() - t0
    other = procstat.foreign_cpu_seconds() - other0
    client = _children_cpu() - children0
    pod_cpu = {pod: procstat.cpu_seconds([pid]) - pod0[pod] for pod, pid in by_pod.items()}
    user = procstat.user_cpu_seconds(by_pod.values()) - user0
    server_cpu = procstat.cpu_seconds([ctx.server_pid]) - server0
    if done.returncode != 0:
        raise LoadgenError(
            f"{ctx.proxy.name}: {' '.join(argv[2:])} exited {done.returncode}: "
            f"{(done.stderr.strip() or done.stdout.strip())[-2000:]}"
        )
    return ClientRun(done.stdout, pod_cpu, server_cpu, other, wall, client, user)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _measured(ctx: Context, argv: list[str], timeout: float) -> Measured:
    """Run one of lab/apps.py's clients (which prints its figures as JSON on its last line)."""
    run = run_client(ctx, argv, timeout)
    out = json.loads(run.stdout.strip().splitlines()[-1])
    by_pod = run.proxy_cpu_by_pod
    return Measured(
        out,
        sum(by_pod.values()),
        by_pod,
        run.server_cpu,
        run.other_cpu,
        run.wall,
        run.proxy_user_cpu,
    )


def bulk(ctx: Context) -> Result:
    host, port = ctx.proxy.target("bulk")
    argv = _client("bulk", host, port, ctx.settings.bulk_mib)
    stop_profile = ctx.around_bulk(ctx.proxy.pids()) if ctx.around_bulk else None
    try:
        m = _measured(ctx, argv, timeout=900)
    finally:
        if stop_profile:
            stop_profile()
    moved = 2 * m.out["bytes_each_way"]
    result: Result = {"bulk_mbps": moved / m.out["seconds"] / 1e6}
    if ctx.proxy.tls:
        result["bulk_cpu_s_per_gib"] = m.proxy_cpu / (moved / 2**30)
        result["bulk_proxy_cpu_pct"] = 100 * m.proxy_cpu / m.out["seconds"]
    result["loadgen"] = m.loadgen()
    return result


def connrate(ctx: Context, concurrency: int) -> Result:
    key = "conn_seq" if concurrency == 1 else f"conn_c{concurrency}"
    host, port = ctx.proxy.target("conn")
    argv = _client("connrate", host, port, ctx.settings.conn_seconds, concurrency)
    m = _measured(ctx, argv, timeout=ctx.settings.conn_seconds + 120)
    out = m.out
    if out["connections"] == 0:
        raise LoadgenError(f"{ctx.proxy.name}: no connection succeeded: {out['first_errors']}")
    result: Result = {
        f"{key}_per_s": out["connections"] / out["seconds"],
        f"{key}_p50_ms": out["p50_ms"],
        f"{key}_p99_ms": out["p99_ms"],
        f"{key}_errors": out["errors"],
    }
    if ctx.proxy.tls:
        result[f"{key}_cpu_ms_per_conn"] = 1000 * m.proxy_cpu / out["connections"]
    result["loadgen"] = m.loadgen()
    if out["errors"]:
        result["first_errors"] = out["first_errors"]
    return result


def request_response(ctx: Context) -> Result:
    host, port = ctx.proxy.target("rr")
    argv = _client("rr", host, port, ctx.settings.rr_count, RR_SIZE)
    m = _measured(ctx, argv, timeout=300)
    result: Result = {
        "rr_p50_us": m.out["p50_us"],
        "rr_p99_us": m.out["p99_us"],
        "rr_p999_us": m.out["p999_us"],
        "loadgen": m.loadgen(),
    }
    if "cdf_us" in m.out:
        result["rr_cdf_us"] = m.out["cdf_us"]
    if ctx.proxy.tls:
        # CPU or waiting? Per round trip, warm-up and handshake included (a few %).
        round_trips = ctx.settings.rr_count + min(RR_WARMUP, ctx.settings.rr_count)
        result["rr_cpu_us_per_rt"] = 1e6 * m.proxy_cpu / round_trips
        # Per side too: a reading of "the sidecar's CPU" may mean one proxy, not A+B.
        for pod, cpu in m.proxy_cpu_by_pod.items():
            result[f"rr_cpu_us_per_rt_{pod}"] = 1e6 * cpu / round_trips
        # The kernel's part (system calls, the network stack) is much the same for
        # every proxy; what differs is mostly the user-space rest.
        result["rr_user_cpu_us_per_rt"] = 1e6 * m.proxy_user_cpu / round_trips
    return result


def rss(ctx: Context, key: str) -> Result:
    """RSS of each side's proxy (A, B) and their sum, in KiB, under ``key``."""
    by_pod = {pod: procstat.rss_kib([pid]) for pod, pid in ctx.proxy.pids().items()}
    if not by_pod:
        return {}
    return {f"{key}_kib": sum(by_pod.values())} | {
        f"{key}_{pod}_kib": kib for pod, kib in by_pod.items()
    }


def idle(ctx: Context) -> Result:
    """RSS of the proxies before and while the client holds ``idle_conns`` connections."""
    count = ctx.settings.idle_conns
    host, port = ctx.proxy.target("idle")
    pids = list(ctx.proxy.pids().values())
    before = procstat.rss_kib(pids)
    proc = ctx.proxy.lab.topology.popen(
        "a",
        _client("idle", host, port, count),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin and proc.stdout and proc.stderr
    try:
        if not select.select([proc.stdout], [], [], 300)[0]:
            raise LoadgenError(f"{ctx.proxy.name}: idle client did not open {count} connections")
        line = proc.stdout.readline()
        if not line:
            raise LoadgenError(
                f"{ctx.proxy.name}: idle client failed: {proc.stderr.read().decode()[-2000:]}"
            )
        opened = json.loads(line)
        time.sleep(0.5)  # let the last handshakes' buffers settle
        after = procstat.rss_kib(pids)
    finally:
        proc.stdin.close()
        try:
            proc.wait(60)
        finally:
            ctx.proxy.lab.topology.stop(proc)
    result: Result = {"idle_open_per_s": opened["opened"] / opened["seconds"]}
    if pids:
        result["idle_rss_before_kib"] = before
        result["idle_rss_after_kib"] = after
        result["idle_kib_per_conn"] = (after - before) / count
    return result
