"""One PostgreSQL connection for the whole task (db/engine.py `task_connection`), against the
real PostgreSQL and Dovecot: a real sync_mailbox run, its ledger writes included, checks out one
connection and returns it in transaction mode; a connection broken in the middle of a task is
never used again, and the task's next statement runs on a fresh one."""

from __future__ import annotations

import dataclasses
import logging
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from mailworker.celery_app import app
from mailworker.db.engine import autocommit_connection, get_engine, session_scope, task_connection
from mailworker.db.locks import advisory_lock, lock_key
from mailworker.settings import Settings
from mailworker.tasks import base, ledger, sync
from sqlalchemy import Engine, create_engine, event, func, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from tests.fixtures.servers import attempts

# Tasks are used through their modules: a task object in this module's namespace would be
# evaluated by pytest's collection, before the environment that configures the app is set.


@pytest.fixture
def task_settings(default_env, monkeypatch) -> Iterator[Settings]:
    """This process as a worker at the shipped defaults (tasks run in it with `apply`), except
    that INBOX is the junk folder: the mail a sync stores queues no classify_spam on the
    session's broker (queueing uses no database)."""
    for name in [name for name in default_env if name.startswith("MAILWORKER_")]:
        monkeypatch.setenv(name, default_env[name])
    monkeypatch.setenv("MAILWORKER_JUNK_FOLDER", "INBOX")
    base.worker_settings.cache_clear()
    app.finalize(auto=True)  # binds the tasks to the app, as a worker's start does
    yield base.worker_settings()
    base.worker_settings.cache_clear()


class PoolUse:
    """Checkouts and checkins of an engine's pool while counting."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.checkouts = 0
        # Each connection's autocommit flag as it came back, None for one invalidated.
        self.checkins: list[bool | None] = []

    def _checkout(self, *_: Any) -> None:
        self.checkouts += 1

    def _checkin(self, dbapi_connection: Any, *_: Any) -> None:
        self.checkins.append(None if dbapi_connection is None else dbapi_connection.autocommit)

    def __enter__(self) -> PoolUse:
        event.listen(self.engine.pool, "checkout", self._checkout)
        event.listen(self.engine.pool, "checkin", self._checkin)
        return self

    def __exit__(self, *_: object) -> None:
        event.remove(self.engine.pool, "checkout", self._checkout)
        event.remove(self.engine.pool, "checkin", self._checkin)


def backend_pid(connection: Any) -> int:
    return int(connection.scalar(select(func.pg_backend_pid())))


def test_a_sync_task_checks_out_one_connection(task_settings, make_account, dovecot, db_engine):
    account = make_account()
    engine = get_engine(task_settings)
    runs = []
    for new in (0, 3):  # the first sync creates the cursor; the second stores 3 messages
        for number in range(new):
            dovecot.deliver(account.address, f"Subject: m{number}\r\n\r\nbody\r\n".encode())
        with PoolUse(engine) as use:
            result = sync.sync_mailbox.apply(args=account.ids)
        assert result.successful(), result.result
        assert result.result["stored"] == new
        runs.append((use.checkouts, use.checkins))
        states = [row.state for row in attempts(db_engine, result.id)]
        assert states == ["succeeded"]  # the ledger's start and finish, on that connection
    # Ledger start and finish, tenancy read, advisory lock, cursor reads and writes, the
    # batch's transaction: one checkout, back to the pool in transaction mode.
    assert runs == [(1, [False]), (1, [False])]


def test_outside_a_task_each_block_checks_out_its_own(task_settings):
    with PoolUse(get_engine(task_settings)) as use:
        with autocommit_connection(task_settings) as connection:
            connection.execute(text("SELECT 1"))
        with session_scope(task_settings) as session:
            session.execute(text("SELECT 1"))
    assert (use.checkouts, use.checkins) == (2, [False, False])


def test_a_session_inside_a_session_of_the_task_gets_its_own_connection(task_settings):
    with PoolUse(get_engine(task_settings)) as use, task_connection():
        with session_scope(task_settings) as outer:
            outer_pid = int(outer.scalar(text("SELECT pg_backend_pid()")))
            with session_scope(task_settings) as inner:
                assert int(inner.scalar(text("SELECT pg_backend_pid()"))) != outer_pid
            # An autocommit statement does not join the open transaction either.
            with autocommit_connection(task_settings) as connection:
                assert backend_pid(connection) != outer_pid
        with autocommit_connection(task_settings) as connection:
            assert backend_pid(connection) == outer_pid
    assert use.checkouts == 3
    assert use.checkins == [False, False, False]


def terminate(db_engine: Engine, pid: int) -> None:
    with db_engine.connect() as other:
        assert other.scalar(select(func.pg_terminate_backend(pid)))


def test_a_connection_broken_in_a_task_is_not_used_again(task_settings, db_engine, caplog):
    engine = get_engine(task_settings)
    key = lock_key("task-connection-test", uuid.uuid4())
    with PoolUse(engine) as use, task_connection():
        with autocommit_connection(task_settings) as connection:
            first = backend_pid(connection)
        terminate(db_engine, first)
        # The ledger is best effort: its write on the dead connection is logged, not raised.
        with caplog.at_level(logging.WARNING, logger="mailworker.tasks.ledger"):
            ledger.finish(task_settings, uuid.uuid4(), "succeeded")
        assert "task ledger not updated" in caplog.text
        # The next statement runs on a fresh connection, which the task keeps.
        with session_scope(task_settings) as session:
            second = int(session.scalar(text("SELECT pg_backend_pid()")))
        assert second != first
        with advisory_lock(task_settings, key) as held:
            assert held
            with autocommit_connection(task_settings) as connection:
                assert backend_pid(connection) == second
        assert use.checkouts == 2
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert use.checkins == [None, False]  # the dead one dropped, not returned


def terminated_mid_task(self: base.MailTask) -> list[int]:
    """Terminates its own backend from another engine, then goes on with its work."""
    settings = self.settings
    with autocommit_connection(settings) as connection:
        first = backend_pid(connection)
    other = create_engine(settings.database_url, poolclass=NullPool)
    terminate(other, first)
    try:
        with autocommit_connection(settings) as connection:
            connection.execute(text("SELECT 1"))
    except OperationalError:
        pass  # the statement that found it dead
    else:
        raise AssertionError("the terminated connection still answered")
    with session_scope(settings) as session:
        second = int(session.scalar(text("SELECT pg_backend_pid()")))
    return [first, second]


def test_a_task_whose_connection_breaks_goes_on_on_a_fresh_one(task_settings, db_engine):
    task = app.task(base=base.MailTask, bind=True, name="tests.terminated_mid_task")(
        terminated_mid_task
    )
    with PoolUse(get_engine(task_settings)) as use:
        result = task.apply()
    assert result.successful(), result.result
    first, second = result.result
    assert first != second
    # The ledger's finish ran on the fresh connection: recorded.
    assert [row.state for row in attempts(db_engine, result.id)] == ["succeeded"]
    assert use.checkouts == 2
    assert use.checkins == [None, False]


def test_each_thread_runs_its_task_on_a_connection_of_its_own(task_settings):
    """The threads pool: the task connection is per thread, one checkout each, never shared, and
    the pool (1 connection per thread) is enough: no overflow."""
    threads = 4
    # A pool of its own, sized as a 4-thread worker's: engines are cached per URL, so the URL is
    # one no other test uses (tests/test_db_autocommit.py's engine, of one connection, has
    # ?sslmode=disable; `target_session_attrs=any` is libpq's default).
    settings = dataclasses.replace(
        task_settings,
        database_url=f"{task_settings.database_url}?sslmode=disable&target_session_attrs=any",
        pool="threads",
        concurrency=threads,
    )
    engine = get_engine(settings)
    assert engine.pool.size() == threads  # type: ignore[attr-defined]
    together = threading.Barrier(threads, timeout=30)
    checkouts: dict[int, int] = {}
    pids: dict[int, set[int]] = {}
    most = [0]

    def checkout(*_: object) -> None:
        ident = threading.get_ident()
        checkouts[ident] = checkouts.get(ident, 0) + 1
        most[0] = max(most[0], engine.pool.checkedout())  # type: ignore[attr-defined]

    def task() -> None:
        mine = pids.setdefault(threading.get_ident(), set())
        with task_connection():
            with autocommit_connection(settings) as connection:
                mine.add(backend_pid(connection))
            together.wait()  # every thread holds its connection now
            with advisory_lock(settings, lock_key("threads-test", uuid.uuid4())) as held:
                assert held
                with session_scope(settings) as session:
                    mine.add(int(session.scalar(text("SELECT pg_backend_pid()"))))
            together.wait()

    event.listen(engine.pool, "checkout", checkout)
    try:
        workers = [threading.Thread(target=task) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
    finally:
        event.remove(engine.pool, "checkout", checkout)
        engine.dispose()
    assert sorted(checkouts.values()) == [1] * threads
    assert all(len(seen) == 1 for seen in pids.values())  # one backend per thread's task
    assert len(set().union(*pids.values())) == threads  # and no two threads on one
    assert most[0] == threads == engine.pool.size()  # type: ignore[attr-defined]
