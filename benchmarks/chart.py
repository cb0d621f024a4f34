"""The PNG: one small bar chart per metric, one bar per set-up, then the latency tails.

Why one subplot per metric: the units differ (MB/s, ms, KiB), so a shared axis
would flatten everything but the largest. matplotlib is optional (the
``bench`` extra); without it the table and JSON are still written.

The tail panels (one per test with a latency distribution: ping-pong, wrk,
redis-benchmark, pgbench) draw each set-up's CDF with latency on a log axis and
the percentile on a "nines" axis (-log10(1 - p): 90, 99, 99.9 and 99.99 equally
spaced), so that the tail is as visible as the median; p50, p99 and p99.9 are
marked on each curve.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .report import CDF_TESTS, METRICS

#: Marked on each distribution.
MARKED = (50.0, 99.0, 99.9)
#: Percentile axis ticks.
NINES = (50.0, 90.0, 99.0, 99.9, 99.99)

COLORS = {
    "plaintext": "#9e9e9e",
    "trio-tproxy": "#1f77b4",
    "stunnel": "#2ca02c",
    "haproxy": "#d62728",
}


def nines(percentile: float) -> float:
    """The "nines" axis: 90% -> 1, 99% -> 2, 99.9% -> 3 (100% has no place: capped at 5)."""
    return min(5.0, -math.log10(max(1e-5, 1 - percentile / 100)))


def draw(
    path: Path,
    proxies: list[str],
    med: dict[str, dict[str, float]],
    title: str,
    cdfs: dict[str, dict[str, list[list[float]]]] | None = None,
) -> str:
    """Write the chart; return a one-line message saying where, or why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return (
            "chart: matplotlib is not installed, no PNG written "
            "(pip install -e '.[bench]' or pip install matplotlib)"
        )
    shown = [m for m in METRICS if any(m.key in med.get(p, {}) for p in proxies)]
    tails = [(test, label) for test, label in CDF_TESTS if (cdfs or {}).get(test)]
    cols = 4
    rows = math.ceil(len(shown) / cols) + math.ceil(len(tails) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    bar_axes = list(axes.flat)[: len(shown)]
    tail_axes = list(axes.flat)[math.ceil(len(shown) / cols) * cols :][: len(tails)]
    for ax, m in zip(bar_axes, shown, strict=True):
        names = [p for p in proxies if m.key in med.get(p, {})]
        values = [med[p][m.key] for p in names]
        bars = ax.bar(names, values, color=[COLORS.get(p, "#555555") for p in names])
        ax.bar_label(bars, labels=[f"{v:,.{m.digits}f}" for v in values], fontsize=7)
        better = "higher" if m.higher_is_better else "lower"
        ax.set_title(f"{m.label}\n({m.unit}, {better} is better)", fontsize=9)
        ax.tick_params(axis="x", labelsize=7, rotation=20)
        ax.tick_params(axis="y", labelsize=7)
        ax.margins(y=0.15)
    for ax, (test, label) in zip(tail_axes, tails, strict=True):
        _tail(ax, label, proxies, (cdfs or {})[test])
    for ax in axes.flat:
        if ax not in bar_axes and ax not in tail_axes:
            ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"chart: {path}"


def _tail(ax: Any, label: str, proxies: list[str], by_proxy: dict[str, list[list[float]]]) -> None:
    """One test's latency CDFs, one curve per set-up, p50/p99/p99.9 marked."""
    from matplotlib.ticker import NullFormatter  # draw() imported matplotlib already

    for proxy in proxies:
        points = sorted((p, us) for p, us in by_proxy.get(proxy, []) if p < 100 and us > 0)
        if not points:
            continue
        color = COLORS.get(proxy, "#555555")
        ax.plot([us for _, us in points], [nines(p) for p, _ in points], color=color, label=proxy)
        # the first point at or above each: redis-benchmark's ticks are 99.219, 99.902, ...
        firsts = (next(((p, us) for p, us in points if p >= m - 1e-9), None) for m in MARKED)
        marked = [pu for pu in firsts if pu is not None]
        ax.plot([us for _, us in marked], [nines(p) for p, _ in marked], "o", color=color, ms=3)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # decades only: minor labels overlap
    ax.set_yticks([nines(p) for p in NINES], [f"{p:g}%" for p in NINES])
    ax.set_xlabel("latency (us, log)", fontsize=7)
    ax.set_title(f"{label}: latency tail\n(dots: p50, p99, p99.9)", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6)
