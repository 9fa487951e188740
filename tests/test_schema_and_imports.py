"""The migrations build exactly the models' schema, and importing the app stays light."""

import os
import socket
import subprocess
import sys
import threading
import uuid

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from mailworker.db import migrate
from mailworker.db.models import Base
from mailworker.settings import load_settings


def test_migrations_match_the_models(db_engine):
    with db_engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == [], "models and migrations differ: add a migration"


def test_importing_the_app_and_tasks_reads_nothing_and_connects_nowhere():
    # A listener stands in for Redis and PostgreSQL: any connection at import would reach it.
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.settimeout(0.2)
    accepted: list[object] = []

    def watch() -> None:
        while not stop.is_set():
            try:
                accepted.append(listener.accept())
            except TimeoutError:
                continue

    stop = threading.Event()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    code = (
        "import mailworker.celery_app\n"
        "import mailworker.tasks.sync, mailworker.tasks.send, mailworker.tasks.delete\n"
        "import mailworker.tasks.spam, mailworker.tasks.periodic\n"
        "print('imported')\n"
    )
    try:
        for env_vars in (
            {},  # no settings at all: importing must not even read them
            {
                "MAILWORKER_BROKER_URL": f"redis://127.0.0.1:{port}/0",
                "MAILWORKER_DATABASE_URL": f"postgresql+psycopg2://u@127.0.0.1:{port}/d",
                "MAILWORKER_ENCRYPTION_KEYS": "A" * 43 + "=",
            },
        ):
            env = {k: v for k, v in os.environ.items() if not k.startswith("MAILWORKER_")}
            ran = subprocess.run(
                [sys.executable, "-c", code],
                env={**env, **env_vars},
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert ran.returncode == 0, ran.stderr
            assert ran.stdout.strip() == "imported"
    finally:
        stop.set()
        watcher.join(5)
        listener.close()
    assert accepted == []


def test_migrations_go_down_and_up_again_and_refuse_to_drop_waiting_sends(postgres_server, app_env):
    # A database of its own: the session's stays at head for the other tests.
    name = f"roundtrip_{uuid.uuid4().hex[:12]}"
    postgres_server.psql(f"CREATE DATABASE {name}")
    settings = load_settings({**app_env, "MAILWORKER_DATABASE_URL": postgres_server.url(name)})
    migrate.upgrade(settings)
    head = migrate.head_revision()
    assert migrate.current_revision(settings) == head

    # A send waiting for its attempt holds content the old schema cannot keep: refused.
    tenant, account = uuid.uuid4(), uuid.uuid4()  # never created (see below)
    postgres_server.psql(
        # The row alone, without its tenant, user and account: foreign keys are not the point.
        "SET session_replication_role = replica;"
        "INSERT INTO sent_messages (id, tenant_id, account_id, message_id, status, attempts,"
        " copied_to_sent, recipients, subject)"
        f" VALUES ('{uuid.uuid4()}', '{tenant}', '{account}', '<w@x>', 'queued', 0, false,"
        " '{}', '')",
        name,
    )
    with pytest.raises(RuntimeError, match="1 send\\(s\\) are queued or deferred"):
        command.downgrade(migrate.alembic_config(settings), "0001")
    assert migrate.current_revision(settings) == head  # one transaction: nothing changed

    postgres_server.psql("DELETE FROM sent_messages", name)
    command.downgrade(migrate.alembic_config(settings), "base")
    assert migrate.current_revision(settings) is None
    migrate.upgrade(settings)
    assert migrate.current_revision(settings) == head
