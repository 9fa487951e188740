"""`mailworker clean logs|results|redis|all`: show the plan, and carry it out only with --yes."""

from pathlib import Path

import click

from mailworker.cli.ops_context import Ops, ops_command
from mailworker.cli.output import render_table
from mailworker.ops import workers
from mailworker.ops.broker import result_backend_client
from mailworker.ops.cleanup import DEFAULT_LOG_DIR, Step, plan_logs, plan_redis, plan_results
from mailworker.ops.errors import Refused
from mailworker.ops.workers import Target

WHAT = ("logs", "results", "redis", "all")


def _log_dir(ops: Ops, explicit: Path | None) -> Path:
    if explicit is not None:
        return explicit
    log_file = ops.settings().log_file
    return Path(log_file).parent if log_file else DEFAULT_LOG_DIR


def _plan(ops: Ops, what: str, log_dir: Path | None) -> list[Step]:
    steps: list[Step] = []
    if what in {"logs", "all"}:
        steps += plan_logs(_log_dir(ops, log_dir))
    if what in {"results", "all"}:
        steps += plan_results(ops.app, result_backend_client(ops.app))
    if what in {"redis", "all"}:
        online = list(workers.ping(ops.app, Target(), ops.timeout))
        with ops.broker() as broker:
            steps += plan_redis(ops.app, broker, online)
    return steps


@click.command()
@click.argument("what", type=click.Choice(WHAT))
@click.option("--yes", is_flag=True, help="Confirm: remove what the plan lists.")
@click.option("--dry-run", is_flag=True, help="Only print the plan (exit 0).")
@click.option(
    "--log-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help=f"Log directory. Default: MAILWORKER_LOG_FILE's directory, else {DEFAULT_LOG_DIR}.",
)
@ops_command
def clean(ops: Ops, what: str, yes: bool, dry_run: bool, log_dir: Path | None) -> None:
    """Remove logs (truncate current, delete rotated), stored results, or queued messages.

    redis purges every task queue and drops unacknowledged entries when no worker is online;
    it never flushes the database (queue bindings and beat's lease and last runs live there).
    """
    steps = _plan(ops, what, log_dir)
    planned = [
        {"target": s.target, "amount": s.amount, "unit": s.unit, "note": s.note or None}
        for s in steps
    ]
    columns = [("target", "WOULD REMOVE"), ("amount", "AMOUNT"), ("unit", "UNIT"), ("note", "NOTE")]
    if dry_run or not yes:
        ops.emit(
            {"what": what, "done": False, "plan": planned},
            render_table(planned, columns, "nothing to clean"),
        )
        if not dry_run:
            raise Refused(f"clean {what}: nothing was removed; add --yes to remove the above")
        return
    done = [{**row, "amount": step.action()} for row, step in zip(planned, steps, strict=True)]
    columns[0] = ("target", "REMOVED")
    ops.emit(
        {"what": what, "done": True, "removed": done},
        render_table(done, columns, "nothing to clean"),
    )
