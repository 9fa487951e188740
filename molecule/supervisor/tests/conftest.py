"""Shared helpers for the supervisor scenario's checklist.

The task helpers (an account on the test mail servers, sending tasks, the `mailworker` wrapper)
are the default scenario's, loaded from its conftest. A test marked
`@pytest.mark.programs("celery-worker", ...)` prints those programs' output files, the celery-health
log and supervisord's own log when it fails: the first things an operator would look at.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import testinfra
import testinfra.utils.ansible_runner

_spec = importlib.util.spec_from_file_location(
    "default_conftest", Path(__file__).resolve().parents[2] / "default" / "tests" / "conftest.py"
)
assert _spec
assert _spec.loader
_default = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _default  # its dataclasses look their module up there
_spec.loader.exec_module(_default)

account = _default.account
mailworker = _default.mailworker
mailworker_json = _default.mailworker_json
send_email = _default.send_email
send_task = _default.send_task
controller_env = _default.controller_env
said = _default.said
playbook = _default.playbook
ROOT = _default.ROOT

INVENTORY = os.environ["MOLECULE_INVENTORY_FILE"]
_inventory = testinfra.utils.ansible_runner.AnsibleRunner(INVENTORY)
APP_HOSTS = _inventory.get_hosts("celery_workers")
OUTPUT_DIR = "/var/log/mailworker/supervisor"
LOG_LINES = 40


def data_host() -> Any:
    """The host of Redis and PostgreSQL (systemd)."""
    return testinfra.get_host(
        f"ansible://{_inventory.get_hosts('redis')[0]}", ansible_inventory=INVENTORY
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "programs(*names): print their output files on failure")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    _default.give_playbooks_their_time(items)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    marker = item.get_closest_marker("programs")
    host = getattr(item, "funcargs", {}).get("host")
    if report.when != "call" or not report.failed or marker is None or host is None:
        return
    files = [f"{OUTPUT_DIR}/{name}.log" for name in (*marker.args, "celery-health")]
    files.append("/var/log/supervisor/supervisord.log")
    for path in files:
        tail = host.run(f"tail -n {LOG_LINES} {shlex.quote(path)}")
        report.sections.append((f"tail {path}", tail.stdout + tail.stderr))


def wait_for(condition: Callable[[], Any], timeout: float, step: float = 1.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return bool(condition())


def status(host: Any, program: str) -> str:
    """supervisor's state of PROGRAM: RUNNING, STOPPED, STARTING, BACKOFF, FATAL..."""
    fields = host.run(f"supervisorctl status {shlex.quote(program)}").stdout.split()
    return fields[1] if len(fields) > 1 else ""


def main_pid(host: Any, program: str) -> int:
    """The PID supervisor started and signals (0 when the program is not running)."""
    out = host.run(f"supervisorctl pid {shlex.quote(program)}").stdout.strip()
    return int(out) if out.isdigit() else 0


def restarted(host: Any, program: str, old_pid: int) -> bool:
    return status(host, program) == "RUNNING" and main_pid(host, program) not in (0, old_pid)


def programs(host: Any) -> list[str]:
    """The mailworker programs of the host, as configured (one per unit of the model)."""
    config = host.file("/etc/supervisor/conf.d/mailworker.conf").content_string
    return re.findall(r"^\[program:([^\]]+)\]$", config, re.MULTILINE)


def program_settings(host: Any, program: str) -> dict[str, str]:
    """PROGRAM's keys in /etc/supervisor/conf.d/mailworker.conf."""
    config = host.file("/etc/supervisor/conf.d/mailworker.conf").content_string
    section = config.split(f"[program:{program}]\n", 1)[1].split("\n[", 1)[0]
    return dict(
        line.split("=", 1) for line in section.splitlines() if "=" in line and line[0] != "#"
    )


def unit_settings(host: Any, program: str) -> dict[str, str]:
    """The unit's own MAILWORKER_* settings (its settings file, written by mailworker_app)."""
    text = host.file(f"/etc/mailworker/{program}.env").content_string
    return dict(re.findall(r'^(MAILWORKER_[A-Z0-9_]+)="(.*)"$', text, re.MULTILINE))


def worker_healthy(host: Any, program: str) -> bool:
    env = f"MAILWORKER_ENV_FILES=/etc/mailworker/{program}.env"
    return host.run(f"{env} /usr/local/sbin/mailworker health worker").rc == 0
