"""Flower, as an operator checks it: loopback only, read-only, persistent, hardened.

A failing test prints Flower's journal (the `units` marker, see conftest.py).
"""

import os
import re

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


def unit_property(host, name: str, unit: str = UNIT) -> str:
    return host.check_output(f"systemctl show --property={name} --value {unit}")


def flower_argv(host) -> list[str]:
    pid = unit_property(host, "MainPID")
    return host.file(f"/proc/{pid}/cmdline").content_string.split("\0")


def local_status(host, path: str, method: str = "GET") -> int:
    return int(
        host.check_output(
            f"curl --silent --max-time 10 --output /dev/null --write-out '%{{http_code}}' "
            f"--request {method} {LOCAL}/{path}"
        )
    )


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


def test_flower_is_prefixed_persistent_and_read_only(host):
    argv = flower_argv(host)
    assert "--url_prefix=flower" in argv, argv
    assert "--persistent=True" in argv, argv
    assert f"--db={STATE_DIR}/flower.db" in argv, argv
    has_read_only = host.run(
        "/opt/mailworker/venv/bin/python -c "
        "'import flower.options, tornado.options, sys; "
        'sys.exit(0 if "read_only" in tornado.options.options else 1)\''
    )
    if has_read_only.rc == 0:
        assert "--read_only=True" in argv, argv


def test_flower_answers_its_healthcheck_on_loopback(host):
    body = host.check_output(f"curl --silent --fail --max-time 10 {LOCAL}/healthcheck")
    assert body == "OK", body


def test_flower_api_answers_and_control_calls_are_refused(host):
    # The UI's buttons call the API: it answers (nginx authenticates in front of it) ...
    assert local_status(host, "api/workers") == 200
    # ... but read-only Flower refuses anything that changes a worker.
    node = "celery-worker@" + host.check_output("hostname")
    assert local_status(host, f"api/worker/shutdown/{node}", method="POST") == 403


def test_flower_keeps_its_state_in_its_state_directory(host):
    state = host.file(STATE_DIR)
    assert state.is_directory
    assert state.user == "celeryworker"
    assert state.mode == 0o750
    files = host.check_output(f"ls {STATE_DIR}").split()
    assert any(name.startswith("flower.db") for name in files), files


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
