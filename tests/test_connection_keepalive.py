"""Broker, result backend and PostgreSQL connections time out and keep alive, on real sockets.

A peer host that vanishes sends no FIN or RST; these options make the kernel give up on it
within keepalive.DEAD_AFTER seconds instead of hours. The options are read back with getsockopt
from the sockets the application really opens against the session's Redis and PostgreSQL.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import psycopg2
import pytest
import yaml
from mailworker import keepalive
from mailworker.db.engine import forget_engines, get_engine
from mailworker.settings import load_settings
from sqlalchemy import text

from tests.fixtures.servers import celery_client
from tests.fixtures.vanished import needs_iptables, vanished

ROOT = Path(__file__).resolve().parent.parent
TCP = socket.IPPROTO_TCP


def options_of(fd: int) -> dict[str, int]:
    sock = socket.socket(fileno=os.dup(fd))
    try:
        return {
            "keepalive": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            "idle": sock.getsockopt(TCP, socket.TCP_KEEPIDLE),
            "interval": sock.getsockopt(TCP, socket.TCP_KEEPINTVL),
            "count": sock.getsockopt(TCP, socket.TCP_KEEPCNT),
            "user_timeout_ms": sock.getsockopt(TCP, socket.TCP_USER_TIMEOUT),
        }
    finally:
        sock.close()


EXPECTED = {"keepalive": 1, "idle": 60, "interval": 10, "count": 3}


def test_the_keepalive_bound_is_ninety_seconds():
    assert (keepalive.IDLE, keepalive.INTERVAL, keepalive.COUNT) == (60, 10, 3)
    assert keepalive.DEAD_AFTER == 90
    assert keepalive.LOCK_RELEASE_BOUND == 100


def test_broker_connections_time_out_and_keep_alive(app_env):
    app = celery_client(app_env)
    with app.connection_for_write() as connection:
        client = connection.default_channel.client
        pooled = client.connection_pool.get_connection()
        try:
            pooled.connect()
            options = options_of(pooled._sock.fileno())
            del options["user_timeout_ms"]  # redis-py has no such option; the timeout bounds it
            assert options == EXPECTED
            assert pooled._sock.gettimeout() == 30  # a publish on a dead connection fails
            assert pooled.health_check_interval == 25
            assert pooled.retry_on_timeout is False  # no blind replay of a publish
        finally:
            client.connection_pool.release(pooled)


def test_result_backend_connections_time_out_and_keep_alive(app_env):
    backend = celery_client(app_env).backend
    pooled = backend.client.connection_pool.get_connection()
    try:
        pooled.connect()
        assert options_of(pooled._sock.fileno())["keepalive"] == 1
        assert pooled._sock.gettimeout() == 30  # Celery's default would be 120 s
        assert pooled.socket_connect_timeout == 10
    finally:
        backend.client.connection_pool.release(pooled)


def test_postgresql_connections_keep_alive_with_the_bound(app_env, migrated_db):
    settings = load_settings(app_env)
    forget_engines()
    try:
        with get_engine(settings).connect() as connection:
            assert connection.scalar(text("SELECT 1")) == 1
            raw = connection.connection.dbapi_connection
            assert options_of(raw.fileno()) == {**EXPECTED, "user_timeout_ms": 90_000}
    finally:
        forget_engines()


def test_the_postgresql_role_applies_the_workers_keepalive_values():
    defaults = yaml.safe_load((ROOT / "roles/postgresql/defaults/main.yml").read_text())
    assert defaults["postgresql_tcp_keepalives_idle"] == keepalive.IDLE
    assert defaults["postgresql_tcp_keepalives_interval"] == keepalive.INTERVAL
    assert defaults["postgresql_tcp_keepalives_count"] == keepalive.COUNT
    assert defaults["postgresql_tcp_user_timeout"] == keepalive.DEAD_AFTER * 1000
    check = defaults["postgresql_client_connection_check_interval"]
    assert check == f"{keepalive.SERVER_CHECK_INTERVAL}s"
    template = (ROOT / "roles/postgresql/templates/mailworker.conf.j2").read_text()
    for name in (
        "tcp_keepalives_idle",
        "tcp_keepalives_interval",
        "tcp_keepalives_count",
        "tcp_user_timeout",
        "client_connection_check_interval",
    ):
        assert f"\n{name} = " in template
        assert f"postgresql_{name}" in template


@needs_iptables
def test_postgresql_ends_the_session_and_lock_of_a_vanished_client(postgres_server):
    # The server side of the keepalive (roles/postgresql) with short values, so the test takes
    # seconds: the mechanism is what is tested here; the sibling below runs the shipped values.
    took = _session_and_lock_end_after_vanishing(postgres_server, 1, 1, 2, 3000, limit=20)
    assert took < 1 + 1 * 2 + 5, f"ended after {took:.1f} s"


@needs_iptables
@pytest.mark.slow
def test_postgresql_releases_a_vanished_clients_lock_within_the_bound_at_defaults(
    postgres_server,
):
    """At roles/postgresql's defaults: the lock of a worker host cut off from PostgreSQL is free
    again within keepalive.LOCK_RELEASE_BOUND (docs/reliability.md), about 90 s."""
    defaults = yaml.safe_load((ROOT / "roles/postgresql/defaults/main.yml").read_text())
    took = _session_and_lock_end_after_vanishing(
        postgres_server,
        defaults["postgresql_tcp_keepalives_idle"],
        defaults["postgresql_tcp_keepalives_interval"],
        defaults["postgresql_tcp_keepalives_count"],
        defaults["postgresql_tcp_user_timeout"],
        limit=keepalive.LOCK_RELEASE_BOUND + 20,
    )
    print(f"\nPostgreSQL ended a vanished client's session and lock after {took:.1f} s")
    assert keepalive.DEAD_AFTER - 5 <= took <= keepalive.LOCK_RELEASE_BOUND


def _session_and_lock_end_after_vanishing(postgres_server, *values: int, limit: float) -> float:
    """Seconds from the client's vanishing until its backend, and advisory lock, are gone;
    `values`: the server's keepalive idle, interval, count and tcp_user_timeout (ms)."""
    idle, interval, count, user_timeout_ms = values
    dsn = postgres_server.url().replace("postgresql+psycopg2://", "postgresql://")
    client = psycopg2.connect(dsn, keepalives=0)
    client.autocommit = True
    with client.cursor() as cursor:
        cursor.execute(
            f"SET tcp_keepalives_idle = {idle}; SET tcp_keepalives_interval = {interval};"
            f" SET tcp_keepalives_count = {count}; SET tcp_user_timeout = {user_timeout_ms}"
        )
        cursor.execute("SELECT pg_backend_pid(), pg_try_advisory_lock(424242)")
        pid, locked = cursor.fetchone()
    assert locked
    with socket.socket(fileno=os.dup(client.fileno())) as sock:
        port = sock.getsockname()[1]
    observer = psycopg2.connect(dsn)
    observer.autocommit = True

    def alive() -> bool:
        with observer.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,))
            return cursor.fetchone()[0] == 1

    try:
        with vanished(port, postgres_server.port):
            start = time.monotonic()
            while alive() and time.monotonic() - start < limit:
                time.sleep(0.5)
            took = time.monotonic() - start
        assert not alive(), f"the backend of the vanished client is still there after {limit} s"
        with observer.cursor() as cursor:
            cursor.execute("SELECT pg_try_advisory_lock(424242)")
            assert cursor.fetchone()[0], "the vanished client's advisory lock was not released"
            cursor.execute("SELECT pg_advisory_unlock(424242)")
    finally:
        observer.close()
        client.close()
    return took
