"""The migrations build exactly the models' schema, and importing the app stays light."""

import os
import socket
import subprocess
import sys
import threading

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from mailworker.db.models import Base


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
