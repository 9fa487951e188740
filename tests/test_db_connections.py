"""One PostgreSQL connection per running task: while a task holds an advisory lock, its sessions
run on the lock's connection (db/engine.py, db/locks.py), and the lock outlives their commits and
rollbacks."""

from __future__ import annotations

import threading
import uuid

import pytest
from mailworker.db.engine import get_engine, pool_size, session_scope
from mailworker.db.locks import advisory_lock, lock_key, locked_connection
from mailworker.services import outbox
from mailworker.services.access import owned_access
from mailworker.services.send import send
from mailworker.settings import load_settings
from sqlalchemy import Engine, event, text


@pytest.fixture
def defaults(default_env):
    return load_settings(default_env)


def backend_pid(settings) -> int:
    with session_scope(settings) as session:
        return int(session.scalar(text("SELECT pg_backend_pid()")))


def lock_holder(db_engine: Engine, key: int) -> int | None:
    """The backend holding advisory lock `key`, seen from another connection."""
    classid, objid = (key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF
    with db_engine.connect() as connection:
        return connection.scalar(
            text(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
                " AND classid::bigint = :classid AND objid::bigint = :objid"
            ),
            {"classid": classid, "objid": objid},
        )


def rolled_back(settings, statement: str = "SELECT 1") -> None:
    with session_scope(settings) as session:
        session.execute(text(statement))
        raise RuntimeError("rolled back")


def test_sessions_run_on_the_lock_connection_while_the_lock_is_held(defaults, db_engine):
    key = lock_key("test", uuid.uuid4())
    outside = backend_pid(defaults)
    with advisory_lock(defaults, key) as held:
        assert held
        holder = lock_holder(db_engine, key)
        assert holder is not None
        assert backend_pid(defaults) == backend_pid(defaults) == holder
    assert lock_holder(db_engine, key) is None
    assert backend_pid(defaults) != holder or outside == holder  # from the pool again


def test_the_lock_outlives_the_sessions_commits_and_rollbacks(defaults, db_engine):
    key = lock_key("test", uuid.uuid4())
    with advisory_lock(defaults, key) as held:
        assert held
        holder = lock_holder(db_engine, key)
        with session_scope(defaults) as session:
            session.execute(text("SELECT 1"))
        assert lock_holder(db_engine, key) == holder
        with pytest.raises(RuntimeError):
            rolled_back(defaults)
        assert lock_holder(db_engine, key) == holder
        with pytest.raises(Exception, match="division by zero"):
            rolled_back(defaults, "SELECT 1 / 0")
        assert lock_holder(db_engine, key) == holder
        # A second try for the same key, from this thread, is another connection: not held.
        with advisory_lock(defaults, key) as again:
            assert not again
        assert backend_pid(defaults) == holder
    assert lock_holder(db_engine, key) is None


def test_a_session_on_the_lock_connection_is_one_transaction(defaults, db_engine):
    """The lock's connection is in autocommit between sessions (db/locks.py); a session on it
    is still one transaction: one transaction id for its statements, and a rollback undoes all
    of them."""
    key = lock_key("test", uuid.uuid4())
    # In a schema of its own: the migrations test compares the public one.
    schema = f"probe_{uuid.uuid4().hex}"
    name = f"{schema}.probe"
    with db_engine.begin() as connection:
        connection.execute(text(f"CREATE SCHEMA {schema}"))
        connection.execute(text(f"CREATE TABLE {name} (n int)"))
    try:
        with locked_connection(defaults, key) as held:
            assert held is not None
            with session_scope(defaults) as session:
                first = session.scalar(text("SELECT txid_current()"))
                session.execute(text(f"INSERT INTO {name} VALUES (1)"))
                assert session.scalar(text("SELECT txid_current()")) == first
            with pytest.raises(RuntimeError), session_scope(defaults) as session:  # noqa: PT012
                session.execute(text(f"INSERT INTO {name} VALUES (2)"))
                raise RuntimeError("rolled back")
            # Back in autocommit: each statement its own transaction.
            one = held.scalar(text("SELECT txid_current()"))
            assert held.scalar(text("SELECT txid_current()")) != one
            assert lock_holder(db_engine, key) is not None
        with db_engine.connect() as connection:
            assert connection.scalars(text(f"SELECT n FROM {name}")).all() == [1]
    finally:
        with db_engine.begin() as connection:
            connection.execute(text(f"DROP SCHEMA {schema} CASCADE"))


def test_other_threads_sessions_do_not_use_a_held_lock_connection(defaults, db_engine):
    key = lock_key("test", uuid.uuid4())
    seen: list[int] = []
    with advisory_lock(defaults, key) as held:
        assert held
        other = threading.Thread(target=lambda: seen.append(backend_pid(defaults)))
        other.start()
        other.join(30)
        assert seen
        assert seen[0] != lock_holder(db_engine, key)


def test_a_send_holds_one_connection_at_a_time(defaults, make_account, smtp_server):
    alice, bob = make_account(), make_account()
    ids = (alice.tenant_id, alice.user_id, alice.account_id)
    tenant, user, account = (uuid.UUID(value) for value in ids)
    entry = outbox.store(defaults, tenant, user, account, {"to": [bob.address], "body": "one"})
    engine = get_engine(defaults)
    mine = threading.get_ident()
    out = {"now": 0, "most": 0}

    def checkout(*_: object) -> None:
        if threading.get_ident() == mine:
            out["now"] += 1
            out["most"] = max(out["most"], out["now"])

    def checkin(*_: object) -> None:
        if threading.get_ident() == mine:
            out["now"] -= 1

    event.listen(engine, "checkout", checkout)
    event.listen(engine, "checkin", checkin)
    try:
        value = send(defaults, owned_access(defaults, tenant, user, account), entry.outbox_id, "t")
    finally:
        event.remove(engine, "checkout", checkout)
        event.remove(engine, "checkin", checkin)
    assert value["status"] == "sent"
    assert len(smtp_server.delivered(entry.message_id)) == 1
    assert out == {"now": 0, "most": 1}


def test_a_worker_pools_one_connection_per_running_task(default_env, defaults):
    threads = {**default_env, "MAILWORKER_POOL": "threads", "MAILWORKER_CONCURRENCY": "20"}
    assert pool_size(load_settings(threads)) == 20
    assert pool_size(load_settings({**threads, "MAILWORKER_POOL": "prefork"})) == 1
    assert get_engine(defaults).pool.size() == pool_size(defaults)  # type: ignore[attr-defined]
