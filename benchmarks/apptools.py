"""Real applications' load generators: their command lines, their output parsed, as pure text.

Why a module of its own, with no I/O: the figures of the app scenarios are only
as good as the parsing of three tools' human-oriented output (wrk,
redis-benchmark, pgbench), which changes between versions. Keeping the parsing
pure lets the unit tests feed it captured sample text, and makes a parse that
finds nothing fail loudly (:class:`ParseError`) instead of reporting zeros.

Latency is always returned in microseconds, and each tool's distribution as a
CDF: a list of ``[percentile, latency_us]`` points (percentile in 0-100),
which the chart draws on a log-latency "nines" axis.

* **wrk** prints ``Requests/sec``, the socket errors and, with ``--latency``,
  p50/75/90/99. Its Lua ``done()`` hook sees the whole latency histogram:
  :data:`WRK_SCRIPT` prints one ``cdf <percentile> <us>`` line per point of
  :data:`CDF_PERCENTILES` (p99.9 included), parsed here too.
* **redis-benchmark** (7.x, neither ``--csv`` nor ``-q``) prints per test a
  "Latency by percentile distribution" (HdrHistogram ticks, in ms) and a
  summary with the throughput and avg/min/p50/p95/p99/max.
* **pgbench** prints tps and the average latency; the per-transaction log
  (``-l``: one line per transaction, latency in us in the third field) gives
  the percentiles.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

#: Where a CDF is sampled: dense enough for a smooth curve, with the tail's nines.
CDF_PERCENTILES = tuple(sorted({*range(1, 100, 3), 50, 90, 95, 99, 99.5, 99.9, 99.95, 99.99, 100}))

#: wrk's Lua hook: the latency distribution at CDF_PERCENTILES, one line each (us).
WRK_SCRIPT = (
    "done = function(summary, latency, requests)\n"
    "  for _, p in ipairs({" + ", ".join(f"{p:g}" for p in CDF_PERCENTILES) + "}) do\n"
    # wrk's percentile(100) reads 0: the maximum is latency.max
    "    local v = p >= 100 and latency.max or latency:percentile(p)\n"
    '    io.write(string.format("cdf %g %d\\n", p, v))\n'
    "  end\n"
    "end\n"
)


class ParseError(ValueError):
    """The tool's output did not hold the figure we need: the run is not to be trusted."""


@dataclass(frozen=True)
class LoadResult:
    """What one load generator run produced (latencies in us)."""

    requests: int
    seconds: float
    per_s: float
    p50_us: float
    p99_us: float
    p999_us: float | None
    errors: int
    cdf: list[list[float]]


# -- wrk -----------------------------------------------------------------------

_UNITS_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}
_WRK_REQUESTS = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h),", re.M)
_WRK_RATE = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_WRK_PCT = re.compile(r"^\s+(50|75|90|99)(?:\.000)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.M)
_WRK_SOCKET = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", re.M
)
_WRK_STATUS = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_CDF_LINE = re.compile(r"^cdf ([\d.]+) (\d+)\s*$", re.M)


def _us(value: str, unit: str) -> float:
    return float(value) * _UNITS_US[unit]


def parse_wrk(text: str) -> LoadResult:
    """wrk's output with ``--latency`` (and, optionally, WRK_SCRIPT's ``cdf`` lines)."""
    requests = _WRK_REQUESTS.search(text)
    rate = _WRK_RATE.search(text)
    pct = {int(m[1]): _us(m[2], m[3]) for m in _WRK_PCT.finditer(text)}
    if requests is None or rate is None or 50 not in pct or 99 not in pct:
        raise ParseError(f"wrk: no requests, rate or latency distribution in: {text[-800:]!r}")
    socket_errors = _WRK_SOCKET.search(text)
    errors = sum(int(n) for n in socket_errors.groups()) if socket_errors else 0
    status = _WRK_STATUS.search(text)
    if status:
        errors += int(status[1])
    cdf = [[float(m[1]), float(m[2])] for m in _CDF_LINE.finditer(text)]
    return LoadResult(
        requests=int(requests[1]),
        seconds=_us(requests[2], requests[3]) / 1e6,
        per_s=float(rate[1]),
        p50_us=pct[50],
        p99_us=pct[99],
        p999_us=at_percentile(cdf, 99.9),
        errors=errors,
        cdf=cdf,
    )


# -- redis-benchmark -------------------------------------------------------------

_REDIS_TEST = re.compile(r"^====== (.+?) ======\s*$", re.M)
_REDIS_DONE = re.compile(r"^\s*(\d+) requests completed in ([\d.]+) seconds", re.M)
_REDIS_PCT = re.compile(r"^([\d.]+)% <= ([\d.]+) milliseconds \(cumulative count (\d+)\)\s*$", re.M)
_REDIS_RATE = re.compile(r"throughput summary: ([\d.]+) requests per second")
_REDIS_SUMMARY = re.compile(
    r"latency summary \(msec\):\s*\n\s*avg\s+min\s+p50\s+p95\s+p99\s+max\s*\n"
    r"\s*([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)"
)


def parse_redis_benchmark(text: str) -> dict[str, LoadResult]:
    """redis-benchmark 7's full output (no ``-q``, no ``--csv``), by test name (``SET``, ``GET``)."""
    # Progress lines end in \r, not \n: keep what follows the last \r of each line.
    text = "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))
    heads = list(_REDIS_TEST.finditer(text))
    if not heads:
        raise ParseError(f"redis-benchmark: no '====== TEST ======' section in: {text[-800:]!r}")
    out: dict[str, LoadResult] = {}
    for head, nxt in zip(heads, [*heads[1:], None], strict=True):
        name = head[1].split()[0].upper()
        section = text[head.end() : nxt.start() if nxt else len(text)]
        done = _REDIS_DONE.search(section)
        rate = _REDIS_RATE.search(section)
        summary = _REDIS_SUMMARY.search(section)
        if done is None or rate is None or summary is None:
            raise ParseError(f"redis-benchmark {name}: no summary in: {section[-800:]!r}")
        # Only the percentile block: the "Cumulative distribution" block after it has
        # lines of the same form, by latency bucket.
        block = section.split("Latency by percentile distribution:", 1)[-1]
        block = block.split("Cumulative distribution of latencies:", 1)[0]
        cdf = [[float(m[1]), 1000 * float(m[2])] for m in _REDIS_PCT.finditer(block)]
        out[name] = LoadResult(
            requests=int(done[1]),
            seconds=float(done[2]),
            per_s=float(rate[1]),
            p50_us=1000 * float(summary[3]),
            p99_us=1000 * float(summary[5]),
            p999_us=at_percentile(cdf, 99.9),
            errors=0,
            cdf=cdf,
        )
    return out


def combine_redis(tests: dict[str, LoadResult], latency_of: str) -> LoadResult:
    """All tests of one redis-benchmark run as one figure: requests and time summed (the
    proxies' CPU is read around the whole run), the latencies of test ``latency_of``."""
    if latency_of not in tests:
        raise ParseError(f"redis-benchmark: no {latency_of} test in {sorted(tests)}")
    requests = sum(r.requests for r in tests.values())
    # From each test's own rate: "completed in 0.04 seconds" has two decimals only.
    seconds = sum(r.requests / r.per_s for r in tests.values() if r.per_s > 0)
    if seconds <= 0:
        raise ParseError("redis-benchmark: the tests took no time")
    lat = tests[latency_of]
    return dataclasses.replace(lat, requests=requests, seconds=seconds, per_s=requests / seconds)


def summary(result: LoadResult) -> dict[str, float | int | None]:
    """The scalar figures of a result, for the JSON (without the distribution)."""
    return {k: v for k, v in dataclasses.asdict(result).items() if k != "cdf"}


# -- pgbench -----------------------------------------------------------------------

_PG_DONE = re.compile(r"number of transactions actually processed: (\d+)")
_PG_FAILED = re.compile(r"number of failed transactions: (\d+)")
_PG_TPS = re.compile(r"^tps = ([\d.]+)", re.M)
_PG_AVG = re.compile(r"^latency average = ([\d.]+) ms", re.M)
_PG_DURATION = re.compile(r"^duration: (\d+) s", re.M)


def parse_pgbench(text: str, log_lines: Iterable[str] = ()) -> LoadResult:
    """pgbench's summary, and the percentiles from its per-transaction log lines
    (``client_id transaction_no latency_us script_no epoch_s epoch_us``)."""
    done, tps, avg = _PG_DONE.search(text), _PG_TPS.search(text), _PG_AVG.search(text)
    if done is None or tps is None or avg is None:
        raise ParseError(f"pgbench: no transactions, tps or latency in: {text[-800:]!r}")
    latencies = sorted(float(line.split()[2]) for line in log_lines if line.strip())
    failed = _PG_FAILED.search(text)
    duration = _PG_DURATION.search(text)
    cdf = cdf_of(latencies)
    return LoadResult(
        requests=int(done[1]),
        seconds=float(duration[1]) if duration else int(done[1]) / float(tps[1]),
        per_s=float(tps[1]),
        p50_us=percentile(latencies, 50) if latencies else 1000 * float(avg[1]),
        p99_us=percentile(latencies, 99) if latencies else math.nan,
        p999_us=percentile(latencies, 99.9) if latencies else None,
        errors=int(failed[1]) if failed else 0,
        cdf=cdf,
    )


# -- distributions -------------------------------------------------------------------


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile (pct in 0-100) of an already sorted, non-empty list."""
    # round(): 99.9 / 100 * 1000 is 999.0000000000001 in floating point, not 999
    rank = math.ceil(round(pct / 100 * len(sorted_values), 9)) - 1
    rank = max(0, min(len(sorted_values) - 1, rank))
    return sorted_values[rank]


def cdf_of(sorted_values: list[float]) -> list[list[float]]:
    """``[percentile, value]`` at CDF_PERCENTILES; empty for no values."""
    if not sorted_values:
        return []
    return [[float(p), percentile(sorted_values, p)] for p in CDF_PERCENTILES]


def at_percentile(cdf: list[list[float]], pct: float) -> float | None:
    """The latency of the first CDF point at or above ``pct`` (None if the CDF stops below)."""
    for point_pct, value in cdf:
        if point_pct >= pct - 1e-9:
            return value
    return None


# -- figures and rows --------------------------------------------------------------------


def figures(
    key: str, result: LoadResult, proxy_cpu_s: float | None, unit: str = "req"
) -> dict[str, float | int | list[list[float]]]:
    """One scenario's figures under ``key``: rate, latencies in us, errors, and (for a
    TLS set-up) the proxies' CPU in us per request or transaction."""
    out: dict[str, float | int | list[list[float]]] = {
        f"{key}_per_s": result.per_s,
        f"{key}_p50_us": result.p50_us,
        f"{key}_p99_us": result.p99_us,
        f"{key}_errors": result.errors,
    }
    if result.p999_us is not None:
        out[f"{key}_p999_us"] = result.p999_us
    if proxy_cpu_s is not None and result.requests:
        out[f"{key}_cpu_us_per_{unit}"] = 1e6 * proxy_cpu_s / result.requests
    if result.cdf:
        out[f"{key}_cdf_us"] = result.cdf
    return out
