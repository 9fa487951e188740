"""`mailworker worker stats|ping`: what the running worker nodes say about themselves."""

from typing import Any

import click

from mailworker.cli.ops_context import Ops, ops_command, target_options
from mailworker.cli.output import duration, render_table
from mailworker.ops import workers
from mailworker.ops.errors import Unhealthy
from mailworker.ops.workers import Target


@click.group()
def worker() -> None:
    """Ask the running worker nodes (all, --node NAME@HOST, or --this-host)."""


def _require_answers(replies: dict[str, Any], target: Target, timeout: float) -> None:
    missing = [n for n in target.nodes if n not in replies]
    if not replies:
        raise Unhealthy(f"no answer from {target.describe()} within {timeout:g} s")
    if missing:
        raise Unhealthy(f"no answer from {', '.join(missing)} within {timeout:g} s")


@worker.command()
@target_options
@ops_command
def ping(ops: Ops, target: Target) -> None:
    """Ping worker nodes; exit 1 unless every targeted node answers."""
    replies = workers.ping(ops.app, target, ops.timeout)
    rows = [{"node": n, "reply": (r or {}).get("ok", r)} for n, r in replies.items()]
    missing = [{"node": n, "reply": None} for n in target.nodes if n not in replies]
    ops.emit(
        {"replies": replies, "missing": [m["node"] for m in missing]},
        render_table(rows + missing, [("node", "NODE"), ("reply", "REPLY")], "no worker answered"),
    )
    _require_answers(replies, target, ops.timeout)


def stats_row(node: str, stats: dict[str, Any]) -> dict[str, Any]:
    pool = stats.get("pool") or {}
    rusage = stats.get("rusage") or {}
    return {
        "node": node,
        "pid": stats.get("pid"),
        # "celery.concurrency.prefork:TaskPool" -> "prefork"
        "pool": str(pool.get("implementation", "")).split(":")[0].rsplit(".", 1)[-1] or None,
        "concurrency": pool.get("max-concurrency"),
        "processes": len(pool.get("processes") or []),
        "prefetch": stats.get("prefetch_count"),
        "accepted": sum((stats.get("total") or {}).values()),
        "uptime": duration(stats.get("uptime")),
        "max_rss_mb": round(rusage["maxrss"] / 1024, 1) if "maxrss" in rusage else None,
    }


@worker.command()
@target_options
@ops_command
def stats(ops: Ops, target: Target) -> None:
    """Pool, concurrency, tasks accepted since start, uptime and memory of each node."""
    replies = workers.inspect(ops.app, "stats", target, ops.timeout)
    rows = [stats_row(node, s) for node, s in replies.items()]
    ops.emit(
        replies,
        render_table(
            rows,
            [
                ("node", "NODE"),
                ("pid", "PID"),
                ("pool", "POOL"),
                ("concurrency", "CONCURRENCY"),
                ("processes", "PROCESSES"),
                ("prefetch", "PREFETCH"),
                ("accepted", "ACCEPTED"),
                ("uptime", "UPTIME"),
                ("max_rss_mb", "MAX RSS MB"),
            ],
            "no worker answered",
        ),
    )
    _require_answers(replies, target, ops.timeout)
