"""One SQLAlchemy engine per process, created on first use (never at import).

Prefork children must not share their parent's sockets: `forget_engines()` runs in every new
pool process (see tasks/base.py) so each child opens its own connections.

One connection per running task: tasks/base.py runs every task inside `task_connection()`, and
the task's first database use checks a connection out of the pool (with its pre-ping); every
later use in the task runs on it (`autocommit_connection`, `autocommit_session`,
`session_scope`, `transaction_scope`, the advisory lock of db/locks.py), the ledger's last write
included, and it goes
back to the pool when the task ends: one checkout and one pre-ping per task, not one per block.
Between uses it is in autocommit mode, so it holds no transaction open while the task talks to
a mail server. A connection SQLAlchemy invalidated (PostgreSQL restarted, the backend
terminated) is never used again: the task's next use checks out a fresh one. A session opened
inside another gets a connection of its own from the pool (`max_overflow`), as does a block
asking for another database's engine. Outside a task (commands, beat, health checks) each block
checks out its own connection; while an advisory lock is held there, the thread's sessions run
on the lock's connection (`sessions_on`). A session-level advisory lock lives as long as its
connection, whatever the transactions on it commit or roll back.

`session_scope` is a transaction (BEGIN ... COMMIT); `transaction_scope` is the same for Core
statements, without a Session (the sync's batches). `autocommit_connection` is none: each
statement commits by itself, which saves the BEGIN and COMMIT round trips where the work is one
statement, or reads that need no snapshot shared between them (PostgreSQL's READ COMMITTED gives
each statement its own snapshot anyway).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from mailworker import keepalive
from mailworker.errors import TransientError
from mailworker.settings import Settings, mask_url

_engines: dict[str, Engine] = {}
# The connection this thread's sessions run on while it holds an advisory lock.
_lock_connection: ContextVar[Connection | None] = ContextVar("lock_connection", default=None)


@dataclass
class _TaskConnection:
    """The running task's connection: None until its first database use (and after a failed
    checkout)."""

    connection: Connection | None = None


# Set while a task runs (tasks/base.py); a ContextVar, so each thread of the pool has its own.
_task: ContextVar[_TaskConnection | None] = ContextVar("task_connection", default=None)
_IN_SESSION = "mailworker_session_open"  # in Connection.info while a session runs on it


def get_engine(settings: Settings) -> Engine:
    engine = _engines.get(settings.database_url)
    if engine is None:
        engine = create_engine(
            settings.database_url,
            pool_pre_ping=True,  # a PostgreSQL restart costs one reconnect, not a failed task
            hide_parameters=True,  # SQL errors never echo message bodies or password tokens
            pool_size=pool_size(settings),
            # For a session opened inside another (none today) and a lock taken while a
            # session is open.
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


def pool_size(settings: Settings) -> int:
    """One connection per running task (`task_connection`): the threads pool runs
    `concurrency` tasks in one process, prefork and solo one each."""
    return settings.concurrency if settings.pool == "threads" else 1


def forget_engines() -> None:
    """Drop inherited pools without closing the parent's connections (after fork)."""
    for engine in _engines.values():
        engine.dispose(close=False)
    _engines.clear()


@contextmanager
def task_connection() -> Iterator[None]:
    """The block is one task: its database uses share one connection, checked out on the
    first and returned to the pool when the block ends (see the module docstring)."""
    if _task.get() is not None:  # a task run eagerly inside another: the outer task's
        yield
        return
    held = _TaskConnection()
    token = _task.set(held)
    try:
        yield
    finally:
        _task.reset(token)
        if held.connection is not None:
            _give_back(held.connection)


def _held(settings: Settings) -> Connection | None:
    """The running task's connection (autocommit, no transaction marker), checked out now if
    it has none or its last one broke; None outside a task, while a session runs on it, or for
    another database than the task's connection."""
    held = _task.get()
    if held is None:
        return None
    engine = get_engine(settings)
    connection = held.connection
    if connection is not None:
        if connection.engine is not engine:
            return None
        if connection.invalidated or connection.closed:
            # Broken (SQLAlchemy invalidated it on a disconnect error): its DBAPI connection is
            # gone already, closing it returns nothing to the pool. (Its `info` would ask the
            # pool for another connection: not read before this.)
            connection.close()
            held.connection = None
        elif connection.info.get(_IN_SESSION):
            return None
        else:
            _drop_autocommit_marker(connection)
            return connection
    connection = engine.connect()  # the pool's pre-ping replaces a dead connection
    try:
        # A client flag, no round trip (see autocommit_connection).
        connection.connection.dbapi_connection.autocommit = True
    except BaseException:
        connection.close()
        raise
    held.connection = connection
    return connection


def _give_back(connection: Connection) -> None:
    """Return the task's connection to the pool in transaction mode, as the pool lends them."""
    if not connection.invalidated and not connection.closed:
        dbapi = connection.connection.dbapi_connection
        try:
            if not dbapi.closed:
                dbapi.autocommit = False
        except Exception:  # psycopg2 refuses inside a transaction, or the socket is gone
            connection.invalidate()
    connection.close()


@contextmanager
def sessions_on(connection: Connection) -> Iterator[None]:
    """Run this thread's sessions on `connection` (idle between them) inside the block."""
    token = _lock_connection.set(connection)
    try:
        yield
    finally:
        _lock_connection.reset(token)


@contextmanager
def session_scope(settings: Settings) -> Iterator[Session]:
    """A session that commits when the block ends and rolls back when it raises."""
    connection = _transaction_connection(settings)
    if connection is None:
        factory = sessionmaker(get_engine(settings), expire_on_commit=False)
        with factory() as session, session.begin():
            yield session
        return
    # The session begins, commits or rolls back its own transaction on the lock's or the
    # task's connection.
    with (
        _transactions_on(connection),
        Session(bind=connection, expire_on_commit=False) as session,
        session.begin(),
    ):
        yield session


@contextmanager
def transaction_scope(settings: Settings) -> Iterator[Connection]:
    """Core statements in one transaction, on the same connection session_scope would use;
    commits when the block ends, rolls back when it raises. For hot paths: no Session, no ORM
    execution state per statement."""
    connection = _transaction_connection(settings)
    if connection is None:
        with get_engine(settings).begin() as own:
            yield own
        return
    with _transactions_on(connection), connection.begin():
        yield connection


def _transaction_connection(settings: Settings) -> Connection | None:
    """The lock's or the task's connection for a transaction, or None when the block must check
    out its own (none held, or a transaction already open on it)."""
    connection = _lock_connection.get()
    if connection is None or connection.invalidated or connection.closed:
        connection = _held(settings)
    if connection is None or connection.info.get(_IN_SESSION):
        return None
    return connection


@contextmanager
def _transactions_on(connection: Connection) -> Iterator[None]:
    """The lock's or the task's autocommit connection, with real transactions for the block (a
    session's statements commit together); autocommit again after it."""
    _drop_autocommit_marker(connection)
    connection.info[_IN_SESSION] = True
    try:
        with _dbapi_autocommit(connection, False):
            yield
    finally:
        connection.info.pop(_IN_SESSION, None)


def _drop_autocommit_marker(connection: Connection) -> None:
    """End SQLAlchemy's marker of the statements run on `connection` in autocommit: no
    transaction is open on the server, so this sends nothing."""
    if connection.in_transaction():
        connection.commit()


@contextmanager
def autocommit_connection(settings: Settings) -> Iterator[Connection]:
    """A connection in autocommit mode: the running task's, else one from the pool (see the
    module docstring).

    psycopg2's `autocommit` is set on the connection itself, as SQLAlchemy's own pre-ping does:
    a flag of the client (it stops sending BEGIN), so switching it costs no round trip, where
    the isolation_level="AUTOCOMMIT" execution option costs a SET on checkout and one on return.
    """
    connection = _held(settings)
    if connection is not None:
        yield connection
        return
    # Checked out idle (no transaction is open); back to the pool in transaction mode, as every
    # other connection is.
    with get_engine(settings).connect() as connection, _dbapi_autocommit(connection, True):
        yield connection


@contextmanager
def _dbapi_autocommit(connection: Connection, on: bool) -> Iterator[None]:
    """psycopg2's autocommit flag set to `on` for the block, then back to what it was (a client
    flag: no round trip)."""
    dbapi = connection.connection.dbapi_connection
    before = dbapi.autocommit
    dbapi.autocommit = on
    try:
        yield
    finally:
        # An invalidated connection is closed, not returned (and asking for
        # connection.connection would open a new one).
        if not connection.invalidated and not dbapi.closed:
            dbapi.autocommit = before


@contextmanager
def autocommit_session(settings: Settings) -> Iterator[Session]:
    """A session on an autocommit connection: for reads only, each its own statement."""
    with autocommit_connection(settings) as connection, Session(connection) as session:
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
