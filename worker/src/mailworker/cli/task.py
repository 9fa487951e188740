"""`mailworker task status|revoke|send|send-email`: one task by id, a new one by name, or a
message stored in the outbox and sent."""

import importlib
import json
from typing import Any

import click
from celery import states
from celery.exceptions import TimeoutError as ResultTimeout

from mailworker.celery_config import TASK_MODULES
from mailworker.cli.ops_context import Ops, ops_command
from mailworker.cli.output import render_table, to_json
from mailworker.errors import InvalidTaskArguments, MailworkerError, TenantMismatch
from mailworker.ops import workers
from mailworker.ops.errors import BadInput, NotFound, Refused, Unhealthy
from mailworker.ops.queues import all_queues, configured_queues, find_queued, find_unacked
from mailworker.ops.results import require_task_id, stored_result
from mailworker.ops.workers import Target
from mailworker.services import outbox
from mailworker.tenancy import parse_uuid

SEND_EMAIL = "mailworker.tasks.send.send_email"
# How many messages per queue `task status` reads looking for a queued task (bounded work).
QUEUE_SCAN_LIMIT = 20_000


@click.group()
def task() -> None:
    """Look up, revoke or send one task."""


def locate(ops: Ops, task_id: str) -> dict[str, Any]:
    """Where the task is: the result backend, a worker's memory, a queue, or unacked in Redis."""
    stored = stored_result(ops.app, task_id)
    if stored is not None and stored.state in states.READY_STATES:
        return {"id": task_id, "state": stored.state, "where": "result backend", **_stored(stored)}
    held = workers.query_task(ops.app, task_id, Target(), ops.timeout)
    for node, found in held.items():
        info = found["info"] or {}
        return {
            "id": task_id,
            "state": str(found["state"]).upper(),
            "where": node,
            "name": info.get("name"),
            "args": info.get("args"),
            "kwargs": info.get("kwargs"),
        }
    if stored is not None and stored.state != states.PENDING:  # STARTED or RETRY, no holder
        return {"id": task_id, "state": stored.state, "where": "result backend", **_stored(stored)}
    with ops.broker() as broker:
        queue = find_queued(broker, all_queues(ops.app, broker), task_id, QUEUE_SCAN_LIMIT)
        if queue is not None:
            return {"id": task_id, "state": "QUEUED", "where": f"queue {queue}"}
        queue = find_unacked(broker, task_id)
        if queue is not None:
            return {
                "id": task_id,
                "state": "UNACKED",
                "where": f"queue {queue}: delivered, not acknowledged, and no worker holds it "
                f"(Redis redelivers it after the visibility timeout)",
            }
    raise NotFound(
        f"task {task_id} not found: no stored result (results expire after "
        f"{ops.app.conf.result_expires} s), no worker holds it, and it is in no queue"
    )


def _stored(stored: Any) -> dict[str, Any]:
    return {
        "name": stored.name,
        "date_done": stored.date_done,
        "worker": stored.worker,
        "result": stored.result,
        "traceback": stored.traceback,
    }


@task.command()
@click.argument("task_id", metavar="ID")
@ops_command
def status(ops: Ops, task_id: str) -> None:
    """State of task ID; exit 1 when nothing knows it."""
    found = locate(ops, require_task_id(task_id))
    shown = {k: v for k, v in found.items() if k != "traceback" and v is not None}
    ops.emit(found, "\n".join(f"{k:<10} {v}" for k, v in shown.items()))


@task.command()
@click.argument("task_id", metavar="ID")
@click.option(
    "--terminate", is_flag=True, help="Also kill the pool process running it (needs --yes)."
)
@click.option(
    "--signal",
    "signal_name",
    type=click.Choice(["TERM", "KILL", "INT", "USR1"], case_sensitive=False),
    default="TERM",
    show_default=True,
    help="Signal for --terminate.",
)
@click.option("--yes", is_flag=True, help="Confirm --terminate.")
@ops_command
def revoke(ops: Ops, task_id: str, terminate: bool, signal_name: str, yes: bool) -> None:
    """Tell every worker to skip task ID; --terminate --yes also kills it if it runs."""
    task_id = require_task_id(task_id)
    stored = stored_result(ops.app, task_id)
    if stored is not None and stored.state in states.READY_STATES:
        ops.emit(
            {"id": task_id, "state": stored.state, "revoked": False},
            f"task {task_id} already finished ({stored.state}); nothing to revoke",
        )
        return
    if terminate and not yes:
        running = workers.query_task(ops.app, task_id, Target(), ops.timeout)
        where = ", ".join(f"{n} ({f['state']})" for n, f in running.items()) or "no worker now"
        raise Refused(
            f"would revoke task {task_id} and send SIG{signal_name.upper()} to the pool process "
            f"running it (held by: {where}); add --yes to do it"
        )
    replies = workers.revoke(
        ops.app, [task_id], Target(), ops.timeout, terminate=terminate, signal=signal_name.upper()
    )
    if not replies:
        raise Unhealthy(
            f"no worker acknowledged the revoke within {ops.timeout:g} s; revokes live in the "
            "workers' memory, so start a worker and run this again"
        )
    rows = [{"node": n, "reply": (r or {}).get("ok", r)} for n, r in replies.items()]
    ops.emit(
        {"id": task_id, "terminate": terminate, "replies": replies},
        render_table(rows, [("node", "NODE"), ("reply", "REPLY")], ""),
    )


def _json_option(value: str | None, option: str, kind: type) -> Any:
    if value is None:
        return kind()
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise BadInput(f"{option} is not valid JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(parsed, kind):
        expected = "a JSON array" if kind is list else "a JSON object"
        raise BadInput(f"{option} must be {expected}, got {type(parsed).__name__}")
    return parsed


WAIT_OPTION = click.option(
    "--wait",
    type=click.FloatRange(min=0),
    default=0,
    help="Seconds to wait for the result; exit 1 if it fails or does not finish in time.",
)


def known_tasks() -> list[str]:
    """The application's task names, from its task modules (imported, nothing connects)."""
    for module in TASK_MODULES:
        importlib.import_module(module)
    from mailworker.celery_app import app  # noqa: PLC0415 (the tasks register on this app)

    return sorted(name for name in app.tasks if not name.startswith("celery."))


@task.command()
@click.argument("name")
@click.option(
    "--args", "args_json", metavar="JSON", help="Positional arguments, e.g. '[1, \"a\"]'."
)
@click.option(
    "--kwargs", "kwargs_json", metavar="JSON", help="Keyword arguments, e.g. '{\"a\": 1}'."
)
@click.option("--queue", help="Queue to send to. Default: the task's route.")
@click.option("--priority", type=click.IntRange(0, 9), help="Message priority (0-9).")
@WAIT_OPTION
@ops_command
def send(
    ops: Ops,
    *,
    name: str,
    args_json: str | None,
    kwargs_json: str | None,
    queue: str | None,
    priority: int | None,
    wait: float,
) -> None:
    """Send task NAME with JSON arguments (the old dev:test)."""
    args = _json_option(args_json, "--args", list)
    kwargs = _json_option(kwargs_json, "--kwargs", dict)
    names = known_tasks()
    if name not in names:  # a worker may run tasks from modules this process does not import
        for registered in workers.inspect(ops.app, "registered", Target(), ops.timeout).values():
            names = sorted({*names, *registered})
    if name not in names:
        raise BadInput(f"unknown task {name!r} (known: {', '.join(names)})")
    if queue is not None and queue not in configured_queues(ops.app):
        raise BadInput(f"unknown queue {queue!r} (known: {', '.join(configured_queues(ops.app))})")
    with ops.broker():  # one bounded PING first: publishing would otherwise retry
        pass
    route = ops.app.amqp.router.route({"queue": queue} if queue else {}, name, args, kwargs)
    target_queue = route["queue"].name
    result = ops.app.send_task(
        name, args=args, kwargs=kwargs, queue=target_queue, priority=priority, retry=False
    )
    sent = {"id": result.id, "task": name, "queue": target_queue}
    if not wait:
        ops.emit(sent, f"sent {name} as {result.id} to queue {target_queue}")
        return
    _wait_and_emit(ops, result, sent, wait)


def _wait_and_emit(ops: Ops, result: Any, sent: dict[str, Any], wait: float) -> None:
    try:
        value = result.get(timeout=wait, propagate=False)
    except ResultTimeout:
        raise Unhealthy(f"task {result.id} did not finish within {wait:g} s") from None
    outcome = {**sent, "state": result.state, "result": value}
    if result.state != states.SUCCESS:
        error = f"{type(value).__name__}: {value}" if isinstance(value, BaseException) else value
        ops.emit({**outcome, "result": str(error)}, f"task {result.id} {result.state}: {error}")
        raise Unhealthy(f"task {result.id} ended in {result.state}")
    ops.emit(outcome, f"task {result.id} SUCCESS: {to_json(value)}")


@task.command("send-email")
@click.argument("tenant_id")
@click.argument("user_id")
@click.argument("account_id")
@click.option(
    "--message",
    "message_file",
    type=click.File("r"),
    default="-",
    show_default=True,
    help='File with the message as JSON ({"to", "subject", "body", ...}); - reads stdin, '
    "so no address or text shows in the process list.",
)
@click.option("--queue", help="Queue to send to. Default: the task's route (send).")
@WAIT_OPTION
@ops_command
def send_email(
    ops: Ops,
    *,
    tenant_id: str,
    user_id: str,
    account_id: str,
    message_file: Any,
    queue: str | None,
    wait: float,
) -> None:
    """Store a message in the outbox and queue send_email for it (ids only in the task)."""
    spec = _json_option(message_file.read(), "--message", dict)
    if queue is not None and queue not in configured_queues(ops.app):
        raise BadInput(f"unknown queue {queue!r} (known: {', '.join(configured_queues(ops.app))})")
    published: list[Any] = []

    def publish(args: list[str]) -> None:
        with ops.broker():  # one bounded PING first: publishing would otherwise retry
            pass
        options = {"queue": queue} if queue else {}
        published.append(ops.app.send_task(SEND_EMAIL, args=args, retry=False, **options))

    try:
        submission = outbox.submit_send(
            ops.settings(),
            parse_uuid("tenant_id", tenant_id),
            parse_uuid("user_id", user_id),
            parse_uuid("account_id", account_id),
            spec,
            publish=publish,
        )
    except (InvalidTaskArguments, TenantMismatch) as exc:
        raise BadInput(str(exc)) from None
    except MailworkerError as exc:
        raise Refused(str(exc)) from None
    stored = {
        "outbox_id": str(submission.outbox_id),
        "message_id": submission.message_id,
        "status": submission.status,
    }
    if not published:
        why = (
            "publishing failed; the send sweeper queues it within "
            f"{ops.settings().send_sweep_interval} s"
            if submission.queued
            else "already in the outbox; not queued again"
        )
        ops.emit(
            {**stored, "task": None}, f"outbox {submission.outbox_id} ({submission.status}): {why}"
        )
        return
    result = published[0]
    sent = {**stored, "id": result.id, "task": SEND_EMAIL}
    if not wait:
        ops.emit(sent, f"stored outbox {submission.outbox_id}; queued {SEND_EMAIL} as {result.id}")
        return
    _wait_and_emit(ops, result, sent, wait)
