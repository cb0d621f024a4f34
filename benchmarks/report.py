"""Medians over repetitions, the printed tables and the JSON file.

Why medians: on a shared 2-core machine one repetition can be disturbed by
anything; the median of three ignores one outlier either way. Each figure is
also shown as a ratio to haproxy, the usual reference for a TLS proxy; the
metric's label says whether higher or lower is better.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REFERENCE = "haproxy"


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool
    digits: int = 1


def _app_metrics(key: str, label: str, unit: str) -> tuple[Metric, ...]:
    """The rows of one real-application scenario (benchmarks/apps.py)."""
    return (
        Metric(f"{key}_per_s", f"{label}, rate", f"{unit}/s", True, 0),
        Metric(f"{key}_p50_us", f"{label}, p50", "us", False, 0),
        Metric(f"{key}_p99_us", f"{label}, p99", "us", False, 0),
        Metric(f"{key}_p999_us", f"{label}, p99.9", "us", False, 0),
        Metric(f"{key}_cpu_us_per_{unit}", f"{label}, proxy CPU A+B", f"us/{unit}", False, 0),
    )


METRICS = (
    Metric("bulk_mbps", "bulk throughput (both dirs)", "MB/s", True, 0),
    Metric("bulk_cpu_s_per_gib", "bulk proxy CPU A+B", "s/GiB", False, 2),
    Metric("conn_seq_per_s", "conn rate, sequential", "conn/s", True, 0),
    Metric("conn_seq_p50_ms", "conn latency seq p50", "ms", False, 2),
    Metric("conn_seq_p99_ms", "conn latency seq p99", "ms", False, 2),
    Metric("conn_seq_cpu_ms_per_conn", "conn proxy CPU A+B, seq", "ms/conn", False, 2),
    Metric("conn_c8_per_s", "conn rate, 8 concurrent", "conn/s", True, 0),
    Metric("conn_c8_p50_ms", "conn latency c8 p50", "ms", False, 2),
    Metric("conn_c8_p99_ms", "conn latency c8 p99", "ms", False, 2),
    Metric("conn_c8_cpu_ms_per_conn", "conn proxy CPU A+B, c8", "ms/conn", False, 2),
    Metric("rr_p50_us", "64 B ping-pong p50", "us", False, 0),
    Metric("rr_p99_us", "64 B ping-pong p99", "us", False, 0),
    Metric("rr_p999_us", "64 B ping-pong p99.9", "us", False, 0),
    Metric("rr_cpu_us_per_rt", "ping-pong proxy CPU A+B", "us/rt", False, 0),
    Metric("rr_cpu_us_per_rt_a", "ping-pong proxy CPU A alone", "us/rt", False, 0),
    Metric("rr_cpu_us_per_rt_b", "ping-pong proxy CPU B alone", "us/rt", False, 0),
    Metric("rr_user_cpu_us_per_rt", "ping-pong proxy CPU A+B, user space", "us/rt", False, 0),
    Metric("idle_kib_per_conn", "idle RSS A+B per conn", "KiB", False, 1),
    Metric("rss_start_a_kib", "RSS of A's proxy at start", "KiB", False, 0),
    Metric("rss_start_kib", "RSS A+B at start", "KiB", False, 0),
    Metric("rss_end_kib", "RSS A+B after all tests", "KiB", False, 0),
    *(
        metric
        for key, label, unit in (
            ("http_ka", "nginx+wrk keep-alive", "req"),
            ("http_close", "nginx+wrk Connection: close", "req"),
            ("redis_p1", "redis-benchmark -P 1", "req"),
            ("redis_p16", "redis-benchmark -P 16", "req"),
            ("pg", "pgbench -S", "tx"),
        )
        for metric in _app_metrics(key, label, unit)
    ),
)

#: The load generators' CPU, per test: (result key in a repetition, label).
LOADGEN_TESTS = (
    ("bulk", "bulk"),
    ("conn_seq", "conn seq"),
    ("conn_c8", "conn c8"),
    ("rr", "ping-pong"),
    ("http_ka", "nginx keep-alive"),
    ("http_close", "nginx close"),
    ("redis_p1", "redis -P 1"),
    ("redis_p16", "redis -P 16"),
    ("pg", "pgbench"),
)


def medians(reps: list[dict[str, Any]]) -> dict[str, float]:
    """Median of each numeric top-level figure over the repetitions that have it."""
    values: dict[str, list[float]] = {}
    for rep in reps:
        for key, value in rep.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                values.setdefault(key, []).append(float(value))
    return {key: statistics.median(v) for key, v in values.items()}


def counts(reps: list[dict[str, Any]]) -> dict[str, int]:
    """How many repetitions produced each figure (a failed test produces none)."""
    found: dict[str, int] = {}
    for rep in reps:
        for key in rep:
            found[key] = found.get(key, 0) + 1
    return found


#: The latency distributions drawn in the PNG: (key prefix, title).
CDF_TESTS = (
    ("rr", "64 B ping-pong"),
    ("http_ka", "nginx+wrk keep-alive"),
    ("http_close", "nginx+wrk Connection: close"),
    ("redis_p1", "redis-benchmark -P 1 (GET)"),
    ("redis_p16", "redis-benchmark -P 16 (GET)"),
    ("pg", "pgbench -S"),
)


def cdfs(reps: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, list[list[float]]]]:
    """Per test, per set-up: the distribution of the repetition whose p99 is the median one
    (a distribution has no median; this one is real and typical)."""
    out: dict[str, dict[str, list[list[float]]]] = {}
    for test, _ in CDF_TESTS:
        for proxy, rows in reps.items():
            have = [r for r in rows if r.get(f"{test}_cdf_us") and f"{test}_p99_us" in r]
            if not have:
                continue
            have.sort(key=lambda r: float(r[f"{test}_p99_us"]))
            out.setdefault(test, {})[proxy] = have[(len(have) - 1) // 2][f"{test}_cdf_us"]
    return out


def loadgen_medians(reps: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Median client and server CPU % (of one core) per test."""
    out: dict[str, dict[str, float]] = {}
    for test, _ in LOADGEN_TESTS:
        rows = [rep["loadgen"][test] for rep in reps if test in rep.get("loadgen", {})]
        if rows:
            out[test] = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    return out


def _cell(value: float | None, reference: float | None, digits: int, n: int, of: int) -> str:
    if value is None or math.isnan(value):
        return "-"
    text = f"{value:,.{digits}f}"
    if n < of:
        text += f" [{n}]"
    if reference:
        text += f" ({value / reference:.2f}x)"
    return text


def table(
    proxies: list[str],
    med: dict[str, dict[str, float]],
    n: dict[str, dict[str, int]],
    repeat: int,
) -> str:
    """Rows are metrics, columns are set-ups; each cell is the median and its ratio to haproxy."""
    ref = med.get(REFERENCE, {}) if REFERENCE in proxies else {}
    head = ["metric", "unit", "better", *proxies]
    rows = [head]
    for m in METRICS:
        if not any(m.key in med.get(p, {}) for p in proxies):
            continue
        cells = [
            _cell(
                med.get(p, {}).get(m.key),
                ref.get(m.key),
                m.digits,
                n.get(p, {}).get(m.key, 0),
                repeat,
            )
            for p in proxies
        ]
        rows.append([m.label, m.unit, "higher" if m.higher_is_better else "lower", *cells])
    return _render(rows, left=3)


def loadgen_table(proxies: list[str], lg: dict[str, dict[str, dict[str, float]]]) -> str:
    """Client / app server / foreign CPU, % of one core, per test and set-up (medians)."""
    rows = [["CPU % of one core: client / server / other", *proxies]]
    for test, label in LOADGEN_TESTS:
        cells = []
        for p in proxies:
            r = lg.get(p, {}).get(test)
            cells.append(
                f"{r['client_cpu_pct']:.0f} / {r['server_cpu_pct']:.0f} / {r['other_cpu_pct']:.0f}"
                if r
                else "-"
            )
        rows.append([label, *cells])
    return _render(rows)


def _render(rows: list[list[str]], left: int = 1) -> str:
    """Plain-text columns: the first ``left`` ones aligned left, figures aligned right."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, sort_keys=False, default=str) + "\n")
