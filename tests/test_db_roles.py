"""Least privilege in PostgreSQL, as roles/postgresql sets it up: the owner role owns the database
(so the public schema) and runs `mailworker db upgrade`; the workers' role reads and writes rows
through default privileges and cannot create, alter or drop anything."""

import subprocess
import uuid

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import ProgrammingError

from tests.fixtures.servers import MAILWORKER

# What tasks/privileges.yml grants, in SQL (the lab converge runs the role itself).
PRIVILEGES = """
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO {app};
ALTER DEFAULT PRIVILEGES FOR ROLE {owner} IN SCHEMA public
  GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {app};
ALTER DEFAULT PRIVILEGES FOR ROLE {owner} IN SCHEMA public GRANT USAGE ON SEQUENCES TO {app};
"""


def mailworker(env: dict[str, str], *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [MAILWORKER, *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def split_roles(postgres_server, app_env):
    suffix = uuid.uuid4().hex[:8]
    owner, app, database = f"owner_{suffix}", f"app_{suffix}", f"roles_{suffix}"
    postgres_server.psql(f"CREATE ROLE {owner} LOGIN; CREATE ROLE {app} LOGIN")
    postgres_server.psql(f"CREATE DATABASE {database} OWNER {owner}")
    postgres_server.psql(PRIVILEGES.format(owner=owner, app=app), database=database)
    env = {
        **app_env,
        "MAILWORKER_DATABASE_URL": postgres_server.url(database).replace("postgres@", f"{app}@"),
        "MAILWORKER_MIGRATION_DATABASE_URL": postgres_server.url(database).replace(
            "postgres@", f"{owner}@"
        ),
    }
    migrated = mailworker(env, "db", "upgrade")
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    yield env
    postgres_server.psql(f"DROP DATABASE {database} WITH (FORCE)")
    postgres_server.psql(f"DROP ROLE {app}; DROP ROLE {owner}")


def test_migrations_run_as_the_owner(split_roles, postgres_server):
    owner = split_roles["MAILWORKER_MIGRATION_DATABASE_URL"].split("//")[1].split("@")[0]
    app = split_roles["MAILWORKER_DATABASE_URL"].split("//")[1].split("@")[0]
    fresh = f"fresh_{uuid.uuid4().hex[:8]}"
    postgres_server.psql(f"CREATE DATABASE {fresh} OWNER {owner}")
    postgres_server.psql(PRIVILEGES.format(owner=owner, app=app), database=fresh)
    url = postgres_server.url(fresh)
    env = {
        **split_roles,
        "MAILWORKER_DATABASE_URL": url.replace("postgres@", f"{app}@"),
        "MAILWORKER_MIGRATION_DATABASE_URL": "",
    }
    # As the playbook does it: the owner's URL on standard input, in no file and no environment.
    stdin = f'MAILWORKER_MIGRATION_DATABASE_URL="{url.replace("postgres@", f"{owner}@")}"\n'
    try:
        refused = mailworker(env, "db", "upgrade")
        migrated = mailworker(env, "--env-file", "-", "db", "upgrade", stdin=stdin)
    finally:
        postgres_server.psql(f"DROP DATABASE {fresh} WITH (FORCE)")
    assert refused.returncode != 0
    assert "permission denied for schema public" in refused.stdout + refused.stderr
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr


@pytest.mark.parametrize(
    "statement",
    [
        "CREATE TABLE intruder (id int)",
        "ALTER TABLE tenants ADD COLUMN intruder int",
        "DROP TABLE tenants",
        "TRUNCATE tenants",
    ],
)
def test_the_workers_role_cannot_change_the_schema(split_roles, statement):
    engine = create_engine(split_roles["MAILWORKER_DATABASE_URL"])
    with engine.connect() as connection, pytest.raises(ProgrammingError):
        connection.execute(text(statement))
    engine.dispose()


def test_the_workers_role_reads_and_writes_rows(split_roles):
    engine = create_engine(split_roles["MAILWORKER_DATABASE_URL"])
    with engine.begin() as connection:
        tenant = connection.execute(
            text(
                "INSERT INTO tenants (id, name, active, created_at) "
                "VALUES (gen_random_uuid(), 'least-privilege', true, now()) RETURNING id"
            )
        ).scalar_one()
        connection.execute(
            text("UPDATE tenants SET name = 'renamed' WHERE id = :id"), {"id": tenant}
        )
        connection.execute(text("DELETE FROM tenants WHERE id = :id"), {"id": tenant})
    engine.dispose()
