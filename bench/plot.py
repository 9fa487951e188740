"""The PNGs: throughput against concurrency, synthetic tasks (both configurations) and real mail."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench.mail_phases import MailResults
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


def plot_mail(mail: MailResults, path: Path) -> None:
    """Sync and send throughput against concurrency: the shipped units and the plain loops."""
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    sync_axis, send_axis = axes
    series: list[tuple[object, str, str, str, list[tuple[int, float]]]] = [
        (sync_axis, "shipped sync_mailbox", "tab:blue", "s",
         [(d.concurrency, d.rate) for _, d in mail.sync]),
        (sync_axis, "plain imaplib + COPY", "tab:gray", "o",
         [(p.loops, p.rate) for _, p in mail.sync_plain]),
        (send_axis, "shipped send_email", "tab:blue", "s",
         [(d.concurrency, d.rate) for _, d in mail.send]),
    ]  # fmt: skip
    for mode, colour in (("session per mail", "tab:gray"), ("reused connection", "tab:green")):
        points = [(p.run.loops, p.run.rate) for _, p in mail.send_plain if p.mode == mode]
        series.append((send_axis, f"plain smtplib, {mode}", colour, "o", points))
    ticks: dict[object, set[int]] = {sync_axis: set(), send_axis: set()}
    for axis, label, colour, marker, points in series:
        ticks[axis].update(x for x, _ in points)
        by_x: dict[int, list[float]] = {}
        for x, rate in points:
            if not math.isnan(rate):
                by_x.setdefault(x, []).append(rate)
        xs = sorted(by_x)
        ys = [statistics.median(by_x[x]) for x in xs]
        axis.plot(xs, ys, marker=marker, color=colour, label=label)  # type: ignore[attr-defined]
    for axis, title, unit in (
        (sync_axis, "sync: new messages into PostgreSQL", "messages/s"),
        (send_axis, "send: mails accepted by the SMTP server", "mails/s"),
    ):
        axis.set_xscale("log", base=2)
        axis.set_xticks(sorted(ticks[axis]), [str(x) for x in sorted(ticks[axis])])
        axis.set_xlabel("concurrency (threads of all units, or plain loops)")
        axis.set_ylabel(unit)
        axis.set_title(title)
        axis.set_ylim(bottom=0)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(
        f"Real work against the protocol's limit, one machine (2 cores); shipped: {mail.summary}",
        fontsize=8,
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
