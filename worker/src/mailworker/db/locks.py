"""PostgreSQL session-level advisory locks: held while a connection lives, so a worker killed
with -9 releases its locks the moment the server sees the connection drop.

The lock's connection is in autocommit mode: taking and releasing the lock are one round trip
each, with no transaction around them; `locked_connection` lends that connection to the lock's
holder for statements of its own that need no transaction. In a task that connection is the
task's own (db/engine.py `task_connection`); outside one it is checked out for the lock. While
the lock is held, the thread's sessions run on that connection too, each a transaction of its
own (db/engine.py `sessions_on`): one connection per running task."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import BigInteger, Connection, bindparam, func, select
from sqlalchemy.exc import SQLAlchemyError

from mailworker.db.engine import autocommit_connection, sessions_on
from mailworker.settings import Settings


def lock_key(*parts: object) -> int:
    """A signed 64-bit key from `parts` (PostgreSQL's bigint lock space)."""
    digest = hashlib.sha256("\x1f".join(str(part) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@contextmanager
def advisory_lock(settings: Settings, key: int) -> Iterator[bool]:
    """Try the lock without waiting; yields whether this process holds it."""
    with locked_connection(settings, key) as connection:
        yield connection is not None


@contextmanager
def locked_connection(settings: Settings, key: int) -> Iterator[Connection | None]:
    """Try the lock without waiting; yields its (autocommit) connection if this process holds
    it, else None."""
    with autocommit_connection(settings) as connection:
        held = bool(connection.scalar(_TRY_LOCK, {"key": key}))
        try:
            if held:
                with sessions_on(connection):
                    yield connection
            else:
                yield None
        finally:
            # A connection SQLAlchemy invalidated (or the task replaced after that) is closed:
            # the server released its locks when it went.
            if held and not (connection.invalidated or connection.closed):
                try:
                    connection.scalar(_UNLOCK, {"key": key})
                except SQLAlchemyError:
                    # Closing the connection is what releases a session lock for sure.
                    connection.invalidate()


# Built once: every task that syncs or sends takes and releases a lock.
_KEY = bindparam("key", type_=BigInteger)
_TRY_LOCK = select(func.pg_try_advisory_lock(_KEY))
_UNLOCK = select(func.pg_advisory_unlock(_KEY))
