"""Autocommit connections and the advisory lock on one, against the real PostgreSQL: each
statement commits by itself, the connection goes back to the pool in transaction mode, and a
lock whose connection died is released without the worker opening a connection to unlock."""

from __future__ import annotations

import dataclasses
import uuid

import pytest
from mailworker.db.engine import autocommit_connection, get_engine, session_scope
from mailworker.db.locks import advisory_lock, lock_key, locked_connection
from sqlalchemy import event, func, select, text
from sqlalchemy.exc import DBAPIError


@pytest.fixture
def own_pool(app_settings):
    """The session's database under a URL of its own, so its engine and pool are this test's."""
    url = f"{app_settings.database_url}?sslmode=disable"
    settings = dataclasses.replace(app_settings, database_url=url)
    yield settings
    get_engine(settings).dispose()


@pytest.fixture
def probe(db_engine):
    """A table of its own, in a schema of its own: the migrations test compares the public one."""
    schema = f"probe_{uuid.uuid4().hex}"
    with db_engine.begin() as connection:
        connection.execute(text(f"CREATE SCHEMA {schema}"))
        connection.execute(text(f"CREATE TABLE {schema}.probe (n int)"))
    yield f"{schema}.probe"
    with db_engine.begin() as connection:
        connection.execute(text(f"DROP SCHEMA {schema} CASCADE"))


def backend_pid(connection) -> int:
    return int(connection.scalar(select(func.pg_backend_pid())))


def test_each_statement_commits_and_the_connection_returns_in_transaction_mode(own_pool, probe):
    engine = get_engine(own_pool)
    with autocommit_connection(own_pool) as connection:
        pid = backend_pid(connection)
        connection.execute(text(f"INSERT INTO {probe} VALUES (1)"))
        with pytest.raises(DBAPIError):
            connection.execute(text(f"INSERT INTO {probe} VALUES ('not a number')"))
        connection.execute(text(f"INSERT INTO {probe} VALUES (2)"))  # nothing aborted
    with engine.connect() as other:
        assert other.scalars(text(f"SELECT n FROM {probe} ORDER BY n")).all() == [1, 2]
    # The same pooled connection, in a transaction again: a failed block leaves nothing.
    seen: list[tuple[int, bool]] = []

    def failing_transaction() -> None:
        with session_scope(own_pool) as session:
            dbapi = session.connection().connection.dbapi_connection
            seen.append((backend_pid(session.connection()), dbapi.autocommit))
            session.execute(text(f"INSERT INTO {probe} VALUES (3)"))
            raise RuntimeError("rolled back")

    with pytest.raises(RuntimeError):
        failing_transaction()
    assert seen == [(pid, False)]
    with engine.connect() as other:
        assert other.scalars(text(f"SELECT n FROM {probe} ORDER BY n")).all() == [1, 2]


def test_a_lock_whose_connection_died_is_released_and_not_reconnected(own_pool):
    engine = get_engine(own_pool)
    key = lock_key("autocommit-test", "died")
    connects: list[object] = []
    with locked_connection(own_pool, key) as locked:
        assert locked is not None
        with advisory_lock(own_pool, key) as held_elsewhere:
            assert not held_elsewhere  # another connection cannot take it
        pid = backend_pid(locked)
        with engine.connect() as other:
            assert other.scalar(select(func.pg_terminate_backend(pid)))
        before = engine.pool.checkedout()

        def on_connect(*_: object) -> None:
            connects.append(object())

        event.listen(engine.pool, "connect", on_connect)
    try:
        # Leaving the block tried the unlock, found the connection dead and dropped it.
        assert connects == []
        assert engine.pool.checkedout() == before - 1
        with advisory_lock(own_pool, key) as held:
            assert held  # the server released the dead session's lock
    finally:
        event.remove(engine.pool, "connect", on_connect)
