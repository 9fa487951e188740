"""A redeploy that changes one unit's settings restarts that program only, warm, through the
restart handler of roles/celery_supervisor (the converge itself starts every program once, so this
is where the handler restarts anything)."""

from __future__ import annotations

import json

import pytest
from conftest import APP_HOSTS, main_pid, playbook, programs, said, status, unit_settings

testinfra_hosts = APP_HOSTS


def output(done) -> str:
    return f"\n--- rc={done.returncode} ---\n{done.stdout[-8000:]}\n{done.stderr[-3000:]}"


@pytest.mark.programs("celery-beat")
def test_new_settings_of_beat_restart_beat_alone(host):
    current = unit_settings(host, "celery-beat").get("MAILWORKER_LOG_LEVEL")
    # A value beat does not have yet, so that `molecule verify` can run again.
    level = "INFO" if current == "WARNING" else "WARNING"
    before = {name: main_pid(host, name) for name in programs(host)}
    settings = {"celery_units_beat_settings": {"MAILWORKER_LOG_LEVEL": level}}
    done = playbook("deploy.yml", "-e", json.dumps(settings))
    assert done.returncode == 0, output(done)
    assert "Restart the programs whose code or settings changed" in said(done), output(done)

    assert status(host, "celery-beat") == "RUNNING"
    assert main_pid(host, "celery-beat") != before["celery-beat"], output(done)
    cmdline = host.file(f"/proc/{main_pid(host, 'celery-beat')}/cmdline").content_string
    assert f"--loglevel={level}" in cmdline.split("\0")
    for name, pid in before.items():
        if name != "celery-beat":
            assert main_pid(host, name) == pid, f"{name} was restarted{output(done)}"
