"""The PNG: throughput against concurrency, both configurations, one panel per workload."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench.suite import IO, NOOP, SweepPoint

STYLE = {
    "default": ("tab:gray", "o", "Celery defaults (prefork)"),
    "shipped": ("tab:blue", "s", "shipped"),
}


def plot_sweep(points: list[SweepPoint], summaries: dict[str, str], path: Path) -> None:
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, workload in zip(axes, (NOOP.name, IO.name), strict=True):
        for label, (colour, marker, name) in STYLE.items():
            mine = sorted(
                (p for p in points if p.workload == workload and p.label == label),
                key=lambda p: p.concurrency,
            )
            good = [p for p in mine if not math.isnan(p.rate)]
            axis.plot(
                [p.concurrency for p in good],
                [p.rate for p in good],
                marker=marker,
                color=colour,
                label=name,
            )
            for p in mine:
                if math.isnan(p.rate):
                    axis.axvline(p.concurrency, color=colour, linestyle=":", linewidth=1)
                    axis.annotate(
                        p.note or "failed",
                        (p.concurrency, 0),
                        rotation=90,
                        fontsize=7,
                        color=colour,
                        va="bottom",
                    )
        axis.set_xscale("log", base=2)
        ticks = sorted({p.concurrency for p in points if p.workload == workload})
        axis.set_xticks(ticks, [str(t) for t in ticks])
        axis.set_xlabel("concurrency (pool processes or threads, all units)")
        axis.set_ylabel("tasks/s (drain of a full queue)")
        axis.set_title(f"{workload} tasks")
        axis.set_ylim(bottom=0)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    shipped = summaries.get("shipped", "")
    figure.suptitle(
        f"Throughput against concurrency, 512 MiB memory limit; shipped: {shipped}", fontsize=8
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
