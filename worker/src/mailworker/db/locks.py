"""PostgreSQL session-level advisory locks: held while a connection lives, so a worker killed
with -9 releases its locks the moment the server sees the connection drop. While the lock is
held, the thread's sessions run on its connection (db/engine.py `sessions_on`)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from mailworker.db.engine import get_engine, sessions_on
from mailworker.settings import Settings


def lock_key(*parts: object) -> int:
    """A signed 64-bit key from `parts` (PostgreSQL's bigint lock space)."""
    digest = hashlib.sha256("\x1f".join(str(part) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@contextmanager
def advisory_lock(settings: Settings, key: int) -> Iterator[bool]:
    """Try the lock without waiting; yields whether this process holds it."""
    with get_engine(settings).connect() as connection:
        held = bool(connection.scalar(select(func.pg_try_advisory_lock(key))))
        connection.commit()
        try:
            if held:
                with sessions_on(connection):
                    yield held
            else:
                yield held
        finally:
            if held:
                try:
                    connection.scalar(select(func.pg_advisory_unlock(key)))
                    connection.commit()
                except SQLAlchemyError:
                    # Closing the connection is what releases a session lock for sure.
                    connection.invalidate()
