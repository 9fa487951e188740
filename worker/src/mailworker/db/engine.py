"""One SQLAlchemy engine per process, created on first use (never at import).

Prefork children must not share their parent's sockets: `forget_engines()` runs in every new
pool process (see tasks/base.py) so each child opens its own connections.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from mailworker import keepalive
from mailworker.errors import TransientError
from mailworker.settings import Settings, mask_url

_engines: dict[str, Engine] = {}


def get_engine(settings: Settings) -> Engine:
    engine = _engines.get(settings.database_url)
    if engine is None:
        # A running task holds up to two connections (its session and an advisory lock); the
        # threads pool runs `concurrency` tasks in one process, prefork and solo one each.
        tasks = settings.concurrency if settings.pool == "threads" else 1
        engine = create_engine(
            settings.database_url,
            pool_pre_ping=True,  # a PostgreSQL restart costs one reconnect, not a failed task
            hide_parameters=True,  # SQL errors never echo message bodies or password tokens
            pool_size=2 * tasks,
            max_overflow=2,
            # Keepalives: a PostgreSQL host that vanished fails the query within DEAD_AFTER
            # seconds instead of hanging the task for hours (mailworker/keepalive.py).
            connect_args={
                "connect_timeout": 10,
                "application_name": "mailworker",
                **keepalive.libpq_options(),
            },
        )
        _engines[settings.database_url] = engine
    return engine


def forget_engines() -> None:
    """Drop inherited pools without closing the parent's connections (after fork)."""
    for engine in _engines.values():
        engine.dispose(close=False)
    _engines.clear()


@contextmanager
def session_scope(settings: Settings) -> Iterator[Session]:
    """A session that commits when the block ends and rolls back when it raises."""
    factory = sessionmaker(get_engine(settings), expire_on_commit=False)
    with factory() as session, session.begin():
        yield session


@contextmanager
def database_errors(settings: Settings) -> Iterator[None]:
    """For commands: a database error becomes one line without SQL, parameters or password."""
    try:
        yield
    except SQLAlchemyError as error:
        original = getattr(error, "orig", None) or error
        lines = str(original).strip().splitlines()
        reason = lines[0] if lines else type(original).__name__
        if "relation" in reason and "does not exist" in reason:
            reason += " (run `mailworker db upgrade`)"
        raise TransientError(f"database {mask_url(settings.database_url)}: {reason}") from None
