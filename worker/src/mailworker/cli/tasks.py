"""`mailworker tasks active|reserved|scheduled|registered|failed`: tasks across the workers."""

from typing import Any

import click

from mailworker.cli.ops_context import Ops, ops_command, target_options
from mailworker.cli.output import render_table, timestamp
from mailworker.ops import workers
from mailworker.ops.errors import Unhealthy
from mailworker.ops.results import stored_results
from mailworker.ops.workers import Target

TASK_COLUMNS = [("node", "NODE"), ("id", "ID"), ("name", "TASK"), ("args", "ARGS")]


@click.group()
def tasks() -> None:
    """List tasks the workers hold, the tasks they know, or recent failures."""


def _ask(ops: Ops, what: str, target: Target) -> dict[str, Any]:
    replies = workers.inspect(ops.app, what, target, ops.timeout)
    if not replies:
        raise Unhealthy(f"no answer from {target.describe()} within {ops.timeout:g} s")
    return replies


def _request_row(node: str, request: dict[str, Any]) -> dict[str, Any]:
    delivery = request.get("delivery_info") or {}
    return {
        "node": node,
        "id": request.get("id"),
        "name": request.get("name"),
        "args": f"{request.get('args')} {request.get('kwargs')}",
        "queue": delivery.get("routing_key"),
        "started": timestamp(request.get("time_start")),
        "pid": request.get("worker_pid"),
    }


@tasks.command()
@target_options
@ops_command
def active(ops: Ops, target: Target) -> None:
    """Tasks running right now."""
    replies = _ask(ops, "active", target)
    rows = [_request_row(n, r) for n, requests in replies.items() for r in requests]
    columns = [*TASK_COLUMNS, ("started", "STARTED"), ("pid", "PID")]
    ops.emit(replies, render_table(rows, columns, "no task is running"))


@tasks.command()
@target_options
@ops_command
def reserved(ops: Ops, target: Target) -> None:
    """Tasks a worker has taken from the queue and not started yet (prefetched)."""
    replies = _ask(ops, "reserved", target)
    rows = [_request_row(n, r) for n, requests in replies.items() for r in requests]
    columns = [*TASK_COLUMNS, ("queue", "QUEUE")]
    ops.emit(replies, render_table(rows, columns, "no task is reserved"))


@tasks.command()
@target_options
@ops_command
def scheduled(ops: Ops, target: Target) -> None:
    """Tasks held by a worker until their ETA or countdown (retries wait here)."""
    replies = _ask(ops, "scheduled", target)
    rows = [
        {**_request_row(n, entry.get("request") or {}), "eta": entry.get("eta")}
        for n, entries in replies.items()
        for entry in entries
    ]
    columns = [*TASK_COLUMNS, ("eta", "ETA")]
    ops.emit(replies, render_table(rows, columns, "no task is scheduled"))


@tasks.command()
@target_options
@ops_command
def registered(ops: Ops, target: Target) -> None:
    """Task names each worker can run."""
    replies = _ask(ops, "registered", target)
    rows = [{"node": n, "task": t} for n, names in replies.items() for t in sorted(names)]
    ops.emit(replies, render_table(rows, [("node", "NODE"), ("task", "TASK")], "no task"))


@tasks.command()
@click.option(
    "--limit", type=click.IntRange(min=1), default=20, show_default=True, help="Newest N only."
)
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice(["FAILURE", "RETRY", "REVOKED"], case_sensitive=False),
    help="States to list (repeatable). Default: FAILURE.",
)
@ops_command
def failed(ops: Ops, limit: int, states: tuple[str, ...]) -> None:
    """Recent failures from the result backend (kept for MAILWORKER_RESULT_EXPIRES seconds)."""
    wanted = frozenset(s.upper() for s in states) or frozenset({"FAILURE"})
    rows = [r.as_dict() for r in stored_results(ops.app, wanted, limit)]
    columns = [
        ("id", "ID"),
        ("name", "TASK"),
        ("state", "STATE"),
        ("date_done", "DONE"),
        ("worker", "WORKER"),
        ("result", "ERROR"),
    ]
    # Task name and worker are stored only with result_extended; show them when they are.
    shown = [c for c in columns if c[0] not in {"name", "worker"} or any(r[c[0]] for r in rows)]
    ops.emit(
        rows,
        render_table(
            rows, shown, f"no task in state {', '.join(sorted(wanted))} among the stored results"
        ),
    )
