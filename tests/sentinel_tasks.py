"""A task whose every run leaves one row in PostgreSQL, loaded into a real worker with --include.

The Sentinel failover test counts the rows: a task lost in Redis has none, one run twice has two.
PostgreSQL, not Redis, holds them, so the failover under test cannot lose the count itself.
"""

from typing import Any

from mailworker.celery_app import app
from mailworker.settings import load_settings
from sqlalchemy import Engine, create_engine, text

TABLE = "sentinel_effects"
_engine: Engine | None = None


@app.task(bind=True, name="tests.sentinel.record", ignore_result=True)
def record(self: Any, run: str, number: int) -> None:
    global _engine  # noqa: PLW0603 - one engine per pool process
    if _engine is None:
        _engine = create_engine(load_settings().database_url)
    with _engine.begin() as connection:
        connection.execute(
            text(f"INSERT INTO {TABLE} (run, number, task_id) VALUES (:run, :number, :task)"),
            {"run": run, "number": number, "task": self.request.id},
        )
