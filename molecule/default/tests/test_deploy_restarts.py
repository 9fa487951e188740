"""playbooks/deploy.yml with a changed setting: `mailworker config check` passes, then every unit
restarts onto the new environment (the handler listening on "celery units changed")."""

from __future__ import annotations

import json
import random

import pytest
from conftest import playbook

SETTING = "MAILWORKER_SYNC_BATCH_SIZE"

pytestmark = pytest.mark.units(
    "celery-worker.service", "celery-worker@io.service", "celery-beat.service"
)


def main_pid(host, unit: str) -> str:
    return host.check_output(f"systemctl show -p MainPID --value {unit}")


def environment_of(host, pid: str) -> str:
    return host.check_output(f"tr '\\0' '\\n' < /proc/{pid}/environ")


def test_deploy_with_a_new_setting_restarts_every_unit_onto_it(host):
    units = ["celery-worker.service", "celery-worker@io.service", "celery-beat.service"]
    if host.service("celery-flower.service").is_running:
        units.append("celery-flower.service")
    before = {unit: main_pid(host, unit) for unit in units}
    value = str(random.randint(50, 99))

    done = playbook("deploy.yml", "-e", json.dumps({"mailworker_app_settings": {SETTING: value}}))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr
    assert "RUNNING HANDLER [celery_systemd : Restart the units whose code" in done.stdout

    assert f'{SETTING}="{value}"' in host.file("/etc/mailworker/mailworker.env").content_string
    for unit in units:
        pid = main_pid(host, unit)  # the handlers' `systemctl restart` has returned by now
        assert pid not in ("0", before[unit]), f"{unit} was not restarted"
        assert f"{SETTING}={value}" in environment_of(host, pid), f"{unit} runs the old settings"
