"""The task_attempts table: one row per execution, written around every task.

Best effort by design: the ledger is for operators and cleanup, so a database hiccup here is
logged and the task goes on (the task's own database work reports the outage properly). A
redelivered task reads its earlier rows back (`history`): attempts that never finished bound its
redeliveries, and the oldest row stands in for its first attempt's time.

Each write is one statement on an autocommit connection (db/engine.py): atomic by itself, with
no BEGIN and COMMIT round trips around it.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, bindparam, func, insert, select, update
from sqlalchemy.exc import SQLAlchemyError

from mailworker.db.engine import autocommit_connection
from mailworker.db.models import TaskAttempt
from mailworker.settings import Settings

logger = logging.getLogger(__name__)


def tenant_hint(args: tuple[Any, ...], kwargs: dict[str, Any]) -> uuid.UUID | None:
    """The tenant_id argument if it is a well-formed UUID (nothing is looked up)."""
    value = kwargs.get("tenant_id", args[0] if args else None)
    try:
        return uuid.UUID(value) if isinstance(value, str) else None
    except ValueError:
        return None


def start(
    settings: Settings,
    *,
    task_id: str,
    task_name: str,
    retries: int,
    redelivered: bool,
    hostname: str,
    tenant_id: uuid.UUID | None,
) -> uuid.UUID | None:
    attempt_id = uuid.uuid4()
    row = {
        "id": attempt_id,
        "task_id": task_id,
        "task_name": task_name,
        "tenant_id": tenant_id,
        "retries": retries,
        "redelivered": redelivered,
        "hostname": hostname,
        "state": "started",
    }
    try:
        with autocommit_connection(settings) as connection:
            connection.execute(_START, row)
    except SQLAlchemyError as error:
        logger.warning("task ledger not written: %s", _first_line(error))
        return None
    return attempt_id


def finish(
    settings: Settings, attempt_id: uuid.UUID | None, state: str, error: str | None = None
) -> None:
    if attempt_id is None:
        return
    try:
        with autocommit_connection(settings) as connection:
            connection.execute(_FINISH, {"b_id": attempt_id, "b_state": state, "b_error": error})
    except SQLAlchemyError as error_:
        logger.warning("task ledger not updated: %s", _first_line(error_))


# Built once, as Core statements on the table: every task runs both.
_ATTEMPTS = TaskAttempt.__table__
_START = insert(_ATTEMPTS)
_FINISH = (
    update(_ATTEMPTS)
    .where(_ATTEMPTS.c.id == bindparam("b_id"))
    .values(state=bindparam("b_state"), error=bindparam("b_error"), finished_at=func.now())
)


@dataclass(frozen=True)
class History:
    """What the ledger knows of a redelivered task's earlier attempts."""

    first_started_at: datetime | None
    # Attempts of this very message (same task id and retry number) that never finished: each
    # one is a worker lost in the middle of it (killed, out of memory, powered off).
    unfinished: int


def history(
    settings: Settings, *, task_id: str, retries: int, current: uuid.UUID | None
) -> History | None:
    """The earlier attempts of `task_id` (not `current`), or None if the ledger is unreachable."""
    unfinished = [TaskAttempt.retries == retries, TaskAttempt.state.in_(("started", "lost"))]
    if current is not None:
        unfinished.append(TaskAttempt.id != current)
    query = select(
        func.min(TaskAttempt.started_at),
        func.count().filter(and_(*unfinished)),
    ).where(TaskAttempt.task_id == task_id)
    try:
        with autocommit_connection(settings) as connection:
            first_started_at, count = connection.execute(query).one()
    except SQLAlchemyError as error:
        logger.warning("task ledger not read: %s", _first_line(error))
        return None
    return History(first_started_at, count)


def _first_line(error: SQLAlchemyError) -> str:
    original = getattr(error, "orig", None) or error
    text = str(original).strip()
    return text.splitlines()[0] if text else type(original).__name__
