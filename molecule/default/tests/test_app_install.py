"""The application install: user, directories, the release, the environment file."""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.units("celery-worker")


def test_service_user_is_a_system_user_without_login_shell(host):
    user = host.user("celeryworker")
    assert user.exists
    assert user.uid < 1000
    assert user.group == "celeryworker"
    assert user.shell == "/usr/sbin/nologin"
    assert host.group("celeryworker").gid < 1000


@pytest.mark.parametrize(
    ("path", "owner", "group", "mode"),
    [
        ("/etc/mailworker", "root", "celeryworker", 0o750),
        ("/etc/mailworker/mailworker.env", "root", "celeryworker", 0o640),
        ("/etc/mailworker/celery-worker.env", "root", "celeryworker", 0o640),
        ("/etc/mailworker/celery-beat.env", "root", "celeryworker", 0o640),
        ("/var/lib/mailworker", "celeryworker", "celeryworker", 0o750),
        ("/var/log/mailworker", "celeryworker", "celeryworker", 0o750),
        ("/opt/mailworker", "root", "root", 0o755),
        ("/opt/mailworker/releases", "root", "root", 0o755),
        ("/usr/local/sbin/mailworker", "root", "root", 0o750),
        ("/etc/logrotate.d/mailworker", "root", "root", 0o644),
    ],
)
def test_owner_and_mode(host, path, owner, group, mode):
    f = host.file(path)
    assert f.exists, path
    assert (f.user, f.group, f.mode) == (owner, group, mode)


def test_environment_file_holds_the_required_settings(host):
    env = host.file("/etc/mailworker/mailworker.env").content_string
    for name in ("MAILWORKER_BROKER_URL", "MAILWORKER_DATABASE_URL", "MAILWORKER_ENCRYPTION_KEYS"):
        assert f"\n{name}=" in env


def test_venv_and_wheelhouse_are_links_to_the_current_release(host):
    venv = host.file("/opt/mailworker/venv")
    wheelhouse = host.file("/opt/mailworker/wheelhouse")
    assert venv.is_symlink
    assert wheelhouse.is_symlink
    release = venv.linked_to.rsplit("/", 1)[0]
    assert wheelhouse.linked_to == f"{release}/wheels"
    assert host.file(f"{release}/WHEELS").contains("mailworker-")
    assert host.file("/opt/mailworker/venv/bin/mailworker").exists


def test_release_holds_exactly_the_recorded_wheels(host):
    check = host.run("cd /opt/mailworker/wheelhouse && sha256sum --check --quiet ../WHEELS")
    assert check.rc == 0, check.stdout + check.stderr


def _pins(lines: str) -> dict[str, str]:
    """name -> version of every `name==version` line, names normalised as pip compares them."""
    return {
        re.sub(r"[-_.]+", "-", name).lower(): version
        for name, version in re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", lines, re.M)
    }


def test_release_venv_holds_exactly_the_locked_versions(host):
    lock = host.file("/opt/mailworker/wheelhouse/requirements.lock").content_string
    freeze = host.run("/opt/mailworker/venv/bin/pip freeze --disable-pip-version-check")
    assert freeze.rc == 0, freeze.stderr
    installed, locked = _pins(freeze.stdout), _pins(lock)
    assert locked["kombu"].startswith("5.7.")
    assert installed == locked


def test_code_is_not_writable_by_the_service_user(host):
    probe = host.run("runuser -u celeryworker -- test -w /opt/mailworker/venv/bin")
    assert probe.rc != 0


def test_config_check_accepts_the_deployed_settings_and_masks_secrets(host):
    result = host.run("mailworker config check")
    assert result.rc == 0, result.stderr
    assert "MAILWORKER_BROKER_URL" in result.stdout
    assert "lab-only-redis-password" not in result.stdout
    assert "lab-only-postgresql-password" not in result.stdout


def test_database_schema_is_at_the_release_head(host):
    result = host.run("mailworker db current")
    assert result.rc == 0, result.stdout + result.stderr
