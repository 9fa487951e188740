"""Flower, as an operator checks it: loopback only, its own basic auth even there, read-only,
no task history on disk, hardened.

A failing test prints Flower's journal (the `units` marker, see conftest.py).
"""

import os
import re
import shlex

import pytest
import testinfra.utils.ansible_runner
from conftest import eventually

testinfra_hosts = testinfra.utils.ansible_runner.AnsibleRunner(
    os.environ["MOLECULE_INVENTORY_FILE"]
).get_hosts("flower")

pytestmark = pytest.mark.units("celery-flower")

UNIT = "celery-flower.service"
LOCAL = "http://127.0.0.1:5555/flower"
STATE_DIR = "/var/lib/mailworker/flower"
LOOPBACK = {"127.0.0.0/8", "::1/128"}
AUTH_FILE = "/etc/mailworker/celery-flower-auth.env"


def unit_property(host, name: str, unit: str = UNIT) -> str:
    return host.check_output(f"systemctl show --property={name} --value {unit}")


def flower_argv(host) -> list[str]:
    pid = unit_property(host, "MainPID")
    return host.file(f"/proc/{pid}/cmdline").content_string.split("\0")


def local_status(host, path: str, method: str = "GET", user: str = "", as_: str = "") -> int:
    """The HTTP status Flower answers on loopback, to root or to the local user `as_`, with basic
    auth `user` ("name:password") if given."""
    command = (
        "curl --silent --max-time 10 --output /dev/null --write-out '%{http_code}' "
        f"--request {method} {LOCAL}/{path}"
    )
    if user:
        command += f" --user {shlex.quote(user)}"
    if as_:
        command = f"runuser -u {as_} -- {command}"
    return int(host.check_output(command))


@pytest.fixture(scope="module")
def flower_credentials(host) -> str:
    """FLOWER_BASIC_AUTH from the root-only file systemd reads ("user:password")."""
    found = re.search(r'^FLOWER_BASIC_AUTH="([^"]+)"', host.file(AUTH_FILE).content_string, re.M)
    assert found, f"no FLOWER_BASIC_AUTH in {AUTH_FILE}"
    return found.group(1)


@pytest.fixture(scope="module", autouse=True)
def _flower_answers(host):
    # An earlier checklist (deploy restarts) may have restarted Flower a moment ago.
    healthy = f"curl --silent --fail --max-time 5 {LOCAL}/healthcheck"
    assert eventually(lambda: host.run(healthy).rc == 0, timeout=60), "Flower does not answer"


def test_flower_unit_is_enabled_and_running(host):
    service = host.service("celery-flower")
    assert service.is_enabled
    assert service.is_running


def test_flower_runs_mailworker_run_flower_as_celeryworker(host):
    exec_start = unit_property(host, "ExecStart")
    assert "argv[]=/opt/mailworker/venv/bin/mailworker run flower " in exec_start
    assert unit_property(host, "User") == "celeryworker"


def test_flower_listens_on_loopback_only(host):
    listeners = host.check_output("ss --no-header --tcp --listening --numeric 'sport = :5555'")
    addresses = {line.split()[3] for line in listeners.splitlines()}
    assert addresses == {"127.0.0.1:5555"}, listeners


def test_flower_is_prefixed_read_only_and_keeps_no_history(host):
    argv = flower_argv(host)
    assert "--url_prefix=flower" in argv, argv
    # A Flower without --read_only refuses to start (mailworker run flower): never left out.
    assert "--read_only=True" in argv, argv
    assert "--persistent=False" in argv, argv


def test_flower_answers_its_healthcheck_on_loopback(host):
    body = host.check_output(f"curl --silent --fail --max-time 10 {LOCAL}/healthcheck")
    assert body == "OK", body


@pytest.mark.parametrize("path", ["api/workers", "api/tasks", "workers", "tasks", "broker"])
def test_a_local_user_without_credentials_gets_401(host, path):
    # Loopback is no protection: every local user reaches 127.0.0.1:5555.
    assert local_status(host, path, as_="nobody") == 401
    assert local_status(host, path, user="flower-proxy:not-the-password") == 401


@pytest.mark.parametrize("path", ["api/workers", "api/tasks", "workers", "tasks"])
def test_with_flowers_own_credentials_it_answers(host, flower_credentials, path):
    assert local_status(host, path, user=flower_credentials) == 200


def test_control_calls_are_refused_even_with_credentials(host, flower_credentials):
    node = "celery-worker@" + host.check_output("hostname")
    path = f"api/worker/shutdown/{node}"
    assert local_status(host, path, method="POST", user=flower_credentials) == 403


def test_flower_credentials_are_root_only_and_on_no_command_line(host, flower_credentials):
    secret = host.file(AUTH_FILE)
    assert (secret.user, secret.group, secret.mode) == ("root", "root", 0o600)
    password = flower_credentials.partition(":")[2]
    assert len(password) >= 16
    assert all(password not in arg for arg in flower_argv(host))
    unit_file = host.file("/etc/systemd/system/celery-flower.service").content_string
    assert f"EnvironmentFile={AUTH_FILE}" in unit_file
    assert password not in unit_file
    assert password not in unit_property(host, "Environment")
    assert "FLOWER_UNAUTHENTICATED_API" not in unit_property(host, "Environment")


def test_flower_keeps_no_task_history_on_disk(host):
    state = host.file(STATE_DIR)
    assert state.is_directory
    assert state.user == "celeryworker"
    assert state.mode == 0o750
    files = host.check_output(f"ls -A {STATE_DIR}").split()
    assert not [name for name in files if name.startswith("flower.db")], files


def test_flower_reaches_only_loopback_and_the_broker(host):
    assert set(unit_property(host, "IPAddressDeny").split()) == {"0.0.0.0/0", "::/0"}
    env = host.file("/etc/mailworker/mailworker.env").content_string
    broker = re.search(r'^MAILWORKER_BROKER_URL="redis://(?:[^@"]*@)?\[?([^\]/":]+)', env, re.M)
    assert broker, "no MAILWORKER_BROKER_URL in mailworker.env"
    allowed = set(unit_property(host, "IPAddressAllow").split())
    extra = {prefix for prefix in allowed - LOOPBACK if not prefix.startswith(broker.group(1))}
    assert not extra, f"IPAddressAllow={sorted(allowed)} (broker {broker.group(1)})"


def test_flower_exposure_score_is_at_most_2(host):
    report = host.run(f"systemd-analyze security --no-pager {UNIT}").stdout
    score = re.search(r"Overall exposure level for \S+: ([0-9.]+)", report)
    assert score, report
    assert float(score.group(1)) <= 2.0, report
