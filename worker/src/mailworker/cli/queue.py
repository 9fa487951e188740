"""`mailworker queue status|list|purge`: queue depths from Redis, consumers, and purge."""

import click

from mailworker.cli.ops_context import Ops, ops_command
from mailworker.cli.output import render_table
from mailworker.ops import workers
from mailworker.ops.errors import Refused, Unhealthy
from mailworker.ops.queues import (
    all_queues,
    configured_queues,
    messages_waiting,
    purge_queue,
    queue_depths,
    require_queue,
)
from mailworker.ops.workers import Target


@click.group()
def queue() -> None:
    """Inspect and purge the task queues in the broker's Redis."""


@queue.command()
@click.option(
    "--max-depth",
    type=click.IntRange(min=0),
    help="Exit 1 when any queue holds more waiting messages than this.",
)
@ops_command
def status(ops: Ops, max_depth: int | None) -> None:
    """Messages waiting and unacknowledged per queue, read straight from Redis."""
    with ops.broker() as broker:
        depths = queue_depths(ops.app, broker)
    rows = [d.as_dict() for d in depths]
    ops.emit(
        rows,
        render_table(
            rows,
            [
                ("queue", "QUEUE"),
                ("messages", "WAITING"),
                ("unacked", "UNACKED"),
                ("overdue", "OVERDUE"),
                ("configured", "CONFIGURED"),
            ],
            "no queue",
        ),
    )
    if max_depth is not None:
        deep = [f"{d.queue} ({d.messages})" for d in depths if d.messages > max_depth]
        if deep:
            raise Unhealthy(f"queues deeper than {max_depth}: {', '.join(deep)}")


@queue.command("list")
@ops_command
def list_queues(ops: Ops) -> None:
    """Every queue: configured or only in Redis, and which worker nodes consume it."""
    with ops.broker() as broker:
        names = all_queues(ops.app, broker)
    configured = set(configured_queues(ops.app))
    consumers: dict[str, list[str]] = {name: [] for name in names}
    for node, queues in workers.inspect(ops.app, "active_queues", Target(), ops.timeout).items():
        for declared in queues or []:
            consumers.setdefault(declared["name"], []).append(node)
    rows = [
        {
            "queue": name,
            "configured": name in configured,
            "consumers": len(nodes),
            "nodes": ", ".join(sorted(nodes)) or None,
        }
        for name, nodes in consumers.items()
    ]
    ops.emit(
        rows,
        render_table(
            rows,
            [
                ("queue", "QUEUE"),
                ("configured", "CONFIGURED"),
                ("consumers", "CONSUMERS"),
                ("nodes", "NODES"),
            ],
            "no queue",
        ),
    )


@queue.command()
@click.argument("name", metavar="QUEUE")
@click.option("--yes", is_flag=True, help="Confirm: delete every waiting message.")
@ops_command
def purge(ops: Ops, name: str, yes: bool) -> None:
    """Delete every waiting message of QUEUE (running and unacknowledged tasks stay)."""
    with ops.broker() as broker:
        require_queue(ops.app, broker, name)
        if not yes:
            waiting = messages_waiting(broker, name)
            raise Refused(
                f"would delete {waiting} waiting message(s) from queue {name!r}; add --yes to do it"
            )
        deleted = purge_queue(broker, name)
    ops.emit(
        {"queue": name, "deleted": deleted}, f"deleted {deleted} message(s) from queue {name!r}"
    )
