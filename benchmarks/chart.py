"""The PNG: one small bar chart per metric, one bar per set-up.

Why one subplot per metric: the units differ (MB/s, ms, KiB), so a shared axis
would flatten everything but the largest. matplotlib is optional (the
``bench`` extra); without it the table and JSON are still written.
"""

from __future__ import annotations

import math
from pathlib import Path

from .report import METRICS

COLORS = {
    "plaintext": "#9e9e9e",
    "trio-tproxy": "#1f77b4",
    "stunnel": "#2ca02c",
    "haproxy": "#d62728",
}


def draw(path: Path, proxies: list[str], med: dict[str, dict[str, float]], title: str) -> str:
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
    cols = 4
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, m in zip(axes.flat, shown, strict=False):
        names = [p for p in proxies if m.key in med.get(p, {})]
        values = [med[p][m.key] for p in names]
        bars = ax.bar(names, values, color=[COLORS.get(p, "#555555") for p in names])
        ax.bar_label(bars, labels=[f"{v:,.{m.digits}f}" for v in values], fontsize=7)
        better = "higher" if m.higher_is_better else "lower"
        ax.set_title(f"{m.label}\n({m.unit}, {better} is better)", fontsize=9)
        ax.tick_params(axis="x", labelsize=7, rotation=20)
        ax.tick_params(axis="y", labelsize=7)
        ax.margins(y=0.15)
    for ax in list(axes.flat)[len(shown) :]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"chart: {path}"
