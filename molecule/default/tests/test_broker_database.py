"""Redis and PostgreSQL: reachable by the application only, never on a public interface."""

from __future__ import annotations

import ipaddress

import pytest

LOOPBACK = {"127.0.0.1", "::1"}


def listeners(host, port: int) -> set[str]:
    out = host.run(f"ss -Hltn 'sport = :{port}'").stdout
    return {
        line.split()[3].rsplit(":", 1)[0].strip("[]") for line in out.splitlines() if line.strip()
    }


@pytest.mark.parametrize(
    ("unit", "port"), [("redis-server.service", 6379), ("postgresql@15-main.service", 5432)]
)
def test_server_listens_on_loopback_only(host, unit, port, request):
    request.node.add_marker(pytest.mark.units(unit))
    assert host.service(unit).is_running
    assert host.service(unit).is_enabled
    addresses = listeners(host, port)
    assert addresses, f"nothing listens on {port}"
    assert all(ipaddress.ip_address(a).is_loopback for a in addresses), addresses


def test_redis_refuses_the_default_user(host):
    result = host.run("redis-cli -h 127.0.0.1 ping")
    assert "NOAUTH" in result.stdout + result.stderr


def test_redis_app_user_has_no_admin_commands(host):
    auth = (
        "REDISCLI_AUTH=lab-only-redis-password-not-secret "
        "redis-cli --no-auth-warning --user mailworker -h 127.0.0.1"
    )
    assert host.run(f"{auth} ping").stdout.strip() == "PONG"
    assert "NOPERM" in host.run(f"{auth} config get maxmemory-policy").stdout
    assert "NOPERM" in host.run(f"{auth} flushall").stdout


def test_redis_never_evicts_queued_tasks(host):
    conf = host.file("/etc/redis/redis.conf")
    assert (conf.user, conf.group, conf.mode) == ("redis", "redis", 0o640)
    assert conf.contains("^maxmemory-policy noeviction$")
    assert conf.contains("^maxmemory [0-9]")
    assert not conf.contains("lab-only-redis-password")  # only its SHA-256


def test_redis_privateusers_override_exists_only_because_this_is_a_container(host):
    assert host.run("systemd-detect-virt --container").rc == 0
    assert host.file("/etc/systemd/system/redis-server.service.d/container.conf").contains(
        "^PrivateUsers=no$"
    )


def test_postgresql_stores_the_app_password_as_scram(host):
    query = "SELECT rolpassword LIKE 'SCRAM-SHA-256$%' FROM pg_authid WHERE rolname = 'mailworker'"
    result = host.run(f'runuser -u postgres -- psql -Atc "{query}"')
    assert result.stdout.strip() == "t", result.stderr


def test_postgresql_database_and_tables_are_owned_by_the_owner_role(host):
    query = "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'mailworker'"
    owner = host.run(f'runuser -u postgres -- psql -Atc "{query}"').stdout.strip()
    assert owner == "mailworker_owner"
    query = "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'public'"
    owners = host.run(f'runuser -u postgres -- psql -d mailworker -Atc "{query}"').stdout.split()
    assert owners == ["mailworker_owner"]


def test_postgresql_workers_role_cannot_change_the_schema(host):
    # As the workers' role over loopback, with the password the units use.
    url = host.run("grep ^MAILWORKER_DATABASE_URL= /etc/mailworker/mailworker.env").stdout
    password = url.split("//", 1)[1].split("@", 1)[0].split(":", 1)[1]
    create = host.run(
        f"PGPASSWORD='{password}' psql -h 127.0.0.1 -U mailworker -d mailworker "
        "-Atc 'CREATE TABLE intruder (id int)'"
    )
    assert create.rc != 0
    assert "permission denied for schema public" in create.stderr
    select = host.run(
        f"PGPASSWORD='{password}' psql -h 127.0.0.1 -U mailworker -d mailworker "
        "-Atc 'SELECT count(*) FROM tenants'"
    )
    assert select.rc == 0, select.stderr


def test_postgresql_refuses_a_wrong_password(host):
    result = host.run(
        "PGPASSWORD=wrong psql -h 127.0.0.1 -U mailworker -d mailworker -Atc 'SELECT 1'"
    )
    assert result.rc != 0
    assert "password authentication failed" in result.stderr
