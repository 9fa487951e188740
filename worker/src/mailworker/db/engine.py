"""One SQLAlchemy engine per process, created on first use (never at import).

Prefork children must not share their parent's sockets: `forget_engines()` runs in every new
pool process (see tasks/base.py) so each child opens its own connections.

One connection per running task: while a task holds an advisory lock (db/locks.py), the lock's
connection carries the task's sessions too (`sessions_on`), instead of a second connection from
the pool for every transaction. A session-level advisory lock lives as long as its connection,
whatever the transactions on it commit or roll back.

`session_scope` is a transaction (BEGIN ... COMMIT). `autocommit_connection` is none: each
statement commits by itself, which saves the BEGIN and COMMIT round trips where the work is one
statement, or reads that need no snapshot shared between them (PostgreSQL's READ COMMITTED gives
each statement its own snapshot anyway).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from mailworker import keepalive
from mailworker.errors import TransientError
from mailworker.settings import Settings, mask_url

_engines: dict[str, Engine] = {}
# The connection this thread's sessions run on while it holds an advisory lock.
_lock_connection: ContextVar[Connection | None] = ContextVar("lock_connection", default=None)
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
    """One connection per running task (its sessions run on its advisory lock's connection):
    the threads pool runs `concurrency` tasks in one process, prefork and solo one each."""
    return settings.concurrency if settings.pool == "threads" else 1


def forget_engines() -> None:
    """Drop inherited pools without closing the parent's connections (after fork)."""
    for engine in _engines.values():
        engine.dispose(close=False)
    _engines.clear()


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
    connection = _lock_connection.get()
    if connection is None or connection.invalidated or connection.info.get(_IN_SESSION):
        factory = sessionmaker(get_engine(settings), expire_on_commit=False)
        with factory() as session, session.begin():
            yield session
        return
    # The session begins, commits or rolls back its own transaction on the lock's connection.
    with (
        _transactions_on(connection),
        Session(bind=connection, expire_on_commit=False) as session,
        session.begin(),
    ):
        yield session


@contextmanager
def _transactions_on(connection: Connection) -> Iterator[None]:
    """The lock's autocommit connection, with real transactions for the block (a session's
    statements commit together); autocommit again after it."""
    if connection.in_transaction():
        # SQLAlchemy's marker of the statements run on it in autocommit: none is open on the
        # server, so this sends nothing.
        connection.commit()
    connection.info[_IN_SESSION] = True
    try:
        with _dbapi_autocommit(connection, False):
            yield
    finally:
        connection.info.pop(_IN_SESSION, None)


@contextmanager
def autocommit_connection(settings: Settings) -> Iterator[Connection]:
    """A pooled connection in autocommit mode (see the module docstring).

    psycopg2's `autocommit` is set on the connection itself, as SQLAlchemy's own pre-ping does:
    a flag of the client (it stops sending BEGIN), so switching it costs no round trip, where
    the isolation_level="AUTOCOMMIT" execution option costs a SET on checkout and one on return.
    """
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
