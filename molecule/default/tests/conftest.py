"""Shared helpers for the default scenario's checklist.

A test marked `@pytest.mark.units("celery-worker", ...)` prints the journal of those units when
it fails (and the health checks' journal): the first thing an operator would look at.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[3]
PLAYBOOK_TIMEOUT = 900
JOURNAL_LINES = 60
TEST_PASSWORD = "lab-only-imap"  # the TEST-ONLY mail user of prepare.yml


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "units(*names): print these units' journal on failure")


def give_playbooks_their_time(items: list[pytest.Item]) -> None:
    """A test of a module that runs playbooks may take as long as one playbook is allowed
    (PLAYBOOK_TIMEOUT) and then some, not pytest.ini's 300 s: the playbook's own bound decides."""
    for item in items:
        module = getattr(item, "module", None)
        if getattr(module, "playbook", None) is not None and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(PLAYBOOK_TIMEOUT + 120))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    give_playbooks_their_time(items)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    marker = item.get_closest_marker("units")
    host = getattr(item, "funcargs", {}).get("host")
    if report.when != "call" or not report.failed or marker is None or host is None:
        return
    for unit in marker.args:
        journal = host.run(f"journalctl -u {shlex.quote(unit)} -n {JOURNAL_LINES} --no-pager")
        report.sections.append((f"journalctl -u {unit}", journal.stdout + journal.stderr))
    # A unit restarted from outside the test: the health checks are the first suspects.
    health = "journalctl -u 'celery-*-health.service' -u 'celery-health-recover@*' -n 30 --no-pager"
    journal = host.run(health)
    report.sections.append(("health checks", journal.stdout + journal.stderr))


def eventually(
    check: Callable[[], Any],
    until: Callable[[Any], bool] = bool,
    timeout: float = 90,
    interval: float = 1,
) -> Any:
    """The first result of `check` that satisfies `until` within `timeout` seconds, else its last
    result (a unit that has just (re)started needs some seconds under load before it answers)."""
    deadline = time.monotonic() + timeout
    result = check()
    while not until(result) and time.monotonic() < deadline:
        time.sleep(interval)
        result = check()
    return result


def mailworker(host: Any, *args: str, stdin: str | None = None) -> Any:
    """`mailworker ARGS` as an operator types it on the box: the root-only wrapper runs the CLI as
    celeryworker with the units' environment file."""
    command = "mailworker " + " ".join(shlex.quote(arg) for arg in args)
    if stdin is not None:
        command = f"printf '%s\\n' {shlex.quote(stdin)} | {command}"
    return host.run(command)


def mailworker_json(host: Any, *args: str) -> dict[str, Any]:
    result = mailworker(host, *args, "--json")
    assert result.stdout.strip(), f"mailworker {' '.join(args)}: no output\n{result.stderr}"
    return json.loads(result.stdout)


@dataclass(frozen=True)
class Account:
    tenant_id: str
    user_id: str
    account_id: str

    def args(self) -> list[str]:
        return [self.tenant_id, self.user_id, self.account_id]


@pytest.fixture(scope="module")
def account(host: Any) -> Account:
    """A fresh tenant with one mailbox on the test IMAP/SMTP servers (unique per module, so
    `molecule verify` can run again on the same instance)."""
    tenant = f"verify-{uuid.uuid4().hex[:8]}"
    result = mailworker(
        host,
        *("account", "add", "--tenant", tenant, "--user", "alice@example.test"),
        *("--imap-host", "127.0.0.1", "--imap-port", "1143", "--imap-security", "plain"),
        *("--smtp-host", "127.0.0.1", "--smtp-port", "2525", "--smtp-security", "plain"),
        "--password-stdin",
        stdin=TEST_PASSWORD,
    )
    assert result.rc == 0, result.stderr
    ids = dict(line.split("=", 1) for line in result.stdout.split())
    return Account(ids["tenant_id"], ids["user_id"], ids["account_id"])


def send_task(host: Any, name: str, args: list[Any], wait: float = 0) -> dict[str, Any]:
    """Send a task by name through the deployed broker; with `wait`, until it finished."""
    options = ["--wait", f"{wait:g}"] if wait else []
    return mailworker_json(host, "task", "send", name, "--args", json.dumps(args), *options)


def send_email(
    host: Any, account: Account, message: dict[str, Any], *options: str
) -> dict[str, Any]:
    """`mailworker task send-email` with the message on stdin (stored in the outbox, then sent)."""
    args = ("task", "send-email", *account.args(), *options, "--json")
    result = mailworker(host, *args, stdin=json.dumps(message))
    assert result.stdout.strip(), f"mailworker {' '.join(args)}: no output\n{result.stderr}"
    return json.loads(result.stdout)


def controller_env() -> dict[str, str]:
    """The environment of the checks' ansible-playbook runs: the project's roles, and no colours
    (Molecule forces them on, and ANSIBLE_FORCE_COLOR wins over ANSIBLE_NOCOLOR)."""
    return {
        **os.environ,
        "ANSIBLE_ROLES_PATH": str(ROOT / "roles"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
    }


def said(result: subprocess.CompletedProcess[str]) -> str:
    """A playbook's stdout and stderr with white space collapsed: the yaml result format folds long
    messages at spaces, and where depends on the lengths of the host names in them."""
    return " ".join((result.stdout + result.stderr).split())


def playbook(name: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """`ansible-playbook playbooks/NAME` from the controller against this scenario's instance."""
    inventory = os.environ.get("MOLECULE_INVENTORY_FILE")
    assert inventory, "MOLECULE_INVENTORY_FILE is not set: run through `molecule verify`"
    command = [
        str(Path(sys.executable).parent / "ansible-playbook"),
        *("-i", inventory, *extra, str(ROOT / "playbooks" / name)),
    ]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=PLAYBOOK_TIMEOUT,
        env=controller_env(),
        check=False,
    )
