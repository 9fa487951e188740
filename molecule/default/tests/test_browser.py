"""Flower and Prometheus in a real browser: Debian's headless Chromium on the controller, through
the nginx proxy, as an operator on another machine sees them.

Without the password the browser shows the proxy's 401 page; with it Flower's Workers page lists
every worker node that answers a ping, and its Tasks page shows a task this test has just run,
once Flower's JavaScript has filled the table. Prometheus's UI (on a flower host that is also a
monitoring host) is the same: the 401 page without the password, with it the Alerts page listing
every alert rule roles/prometheus ships. Each page gets a fresh browser (no cached login)
and a screenshot in build/logs/browser/ (kept with the other test logs), also on failure. About
15 s in all; each browser is bounded by CHROMIUM_TIMEOUT per step.

Another page behind the proxy is one more test: `browse(url, "name", credentials, until=[...])`.
"""

from __future__ import annotations

import html
import json
import os
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import pytest
import testinfra.utils.ansible_runner
import yaml
from chromium import BrowserError, Chromium, Page
from conftest import ROOT, eventually, mailworker_json, send_task

testinfra_hosts = testinfra.utils.ansible_runner.AnsibleRunner(
    os.environ["MOLECULE_INVENTORY_FILE"]
).get_hosts("flower")

pytestmark = pytest.mark.units("nginx", "celery-flower", "prometheus")

SCREENSHOTS = ROOT / "build" / "logs" / "browser"
CREDENTIALS = Path(os.environ["MOLECULE_INVENTORY_FILE"]).parent / ".credentials"
USER = "flower"
CHROMIUM_TIMEOUT = 30
SYNC = "mailworker.tasks.sync.sync_mailbox"
SHIPPED_RULES = ROOT / "roles" / "prometheus" / "files"


class Login(NamedTuple):
    """The proxy's user and password; its repr hides the password (pytest prints the arguments
    of every frame of a failed test's traceback into the log)."""

    user: str
    password: str

    def __repr__(self) -> str:
        return f"Login(user={self.user!r}, password='***')"


def browse(
    url: str,
    name: str,
    credentials: tuple[str, str] | None = None,
    until: Sequence[str] = (),
    window: tuple[int, int] = (1280, 560),
) -> tuple[Page, Path]:
    """Open `url` in a fresh Chromium (new profile: no login remembered), answering the login
    prompt with `credentials` (none: Cancel), wait until its DOM contains every string of `until`,
    and save a screenshot as SCREENSHOTS/NAME.png (NAME-failed.png when the page fell short)."""
    with Chromium(timeout=CHROMIUM_TIMEOUT, window=window) as browser:
        try:
            page = browser.visit(url, credentials=credentials, until=until)
        except BrowserError:
            browser.screenshot(SCREENSHOTS / f"{name}-failed.png")
            raise
        return page, browser.screenshot(SCREENSHOTS / f"{name}.png")


def row(dom: str, key: str) -> str:
    """The table row of the DOM that contains `key` (an attribute or a cell), '' if none."""
    found = re.search(rf"<tr\b(?:(?!</tr>).)*{re.escape(key)}.*?</tr>", dom, re.S)
    return found.group(0) if found else ""


@pytest.fixture(scope="module")
def proxy(host) -> str:
    """The proxy's address as the controller reaches it: the container's on its Docker network."""
    name = host.backend.get_hostname()
    template = "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}"
    inspect = subprocess.run(
        ["docker", "inspect", "--format", template, name],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    addresses = inspect.stdout.split()
    assert inspect.returncode == 0, f"docker inspect {name}: {inspect.stderr}"
    assert addresses, f"{name} has no address on a Docker network"
    return f"https://{addresses[0]}"


@pytest.fixture(scope="module")
def credentials() -> Login:
    return Login(USER, (CREDENTIALS / f"flower-proxy-{USER}.password").read_text().strip())


@pytest.fixture(scope="module", autouse=True)
def _flower_answers(host):
    # An earlier checklist may have restarted Flower a moment ago.
    healthy = "curl --silent --fail --max-time 5 http://127.0.0.1:5555/flower/healthcheck"
    assert eventually(lambda: host.run(healthy).rc == 0, timeout=60), "Flower does not answer"


def test_without_credentials_the_browser_shows_the_proxys_401_page(proxy):
    page, _ = browse(f"{proxy}/flower/", "flower-401", window=(800, 240))
    assert page.status == 401, page
    assert "401 Authorization Required" in page.text, page.text
    assert "Workers" not in page.text, page.text  # nothing of Flower's


def test_with_credentials_the_workers_page_lists_every_worker_node(host, proxy, credentials):
    # The nodes come from the broker (a ping), not from Flower: the page must show them all.
    ping = eventually(lambda: mailworker_json(host, "worker", "ping"), lambda r: r["replies"])
    nodes = sorted(ping["replies"])
    assert len(nodes) >= 2, ping  # celery-worker and celery-worker@io
    titles = [f'title="{html.escape(node)}"' for node in nodes]

    def workers_page() -> Page | BrowserError:
        try:
            return browse(f"{proxy}/flower/workers", "flower-workers", credentials, until=titles)[0]
        except BrowserError as error:
            return error

    # Flower lists the workers it has heard from (events); on a saturated host a page loaded
    # before their next heartbeat reached it lacks some, and the next load shows them.
    page = eventually(workers_page, lambda p: isinstance(p, Page), timeout=90)
    if isinstance(page, BrowserError):
        raise page
    assert page.status == 200, page.text
    for node, title in zip(nodes, titles, strict=True):
        assert "Online" in row(page.dom, title), f"{node} is not online:\n{row(page.dom, title)}"


def test_the_tasks_page_shows_a_task_this_test_just_ran(host, account, proxy, credentials):
    ran = send_task(host, SYNC, account.args(), wait=90)
    assert ran["state"] == "SUCCESS", json.dumps(ran)

    def tasks_page() -> Page:
        url = f"{proxy}/flower/tasks"
        return browse(url, "flower-tasks", credentials, until=[ran["id"]], window=(1440, 480))[0]

    # Flower may list the task a moment before the event of its success has reached it.
    page = eventually(tasks_page, lambda p: "SUCCESS" in row(p.dom, ran["id"]), timeout=20)
    assert page.status == 200, page.text
    task = row(page.dom, ran["id"])
    assert SYNC in task, task
    assert "SUCCESS" in task, task


@pytest.fixture(scope="module")
def alert_names() -> list[str]:
    """Every alert rule roles/prometheus ships, by name."""
    return [
        rule["alert"]
        for path in sorted(SHIPPED_RULES.glob("*.yml"))
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]


@pytest.fixture(scope="module")
def _prometheus_answers(host):
    groups = host.ansible.get_variables()["group_names"]
    assert "monitoring" in groups, f"{host.backend.get_hostname()} is not a monitoring host"
    ready = "curl --silent --fail --max-time 5 http://127.0.0.1:9090/prometheus/-/ready"
    assert eventually(lambda: host.run(ready).rc == 0, timeout=60), "Prometheus is not ready"


@pytest.mark.usefixtures("_prometheus_answers")
def test_without_credentials_prometheus_shows_the_proxys_401_page(proxy):
    page, _ = browse(f"{proxy}/prometheus/classic/alerts", "prometheus-401", window=(800, 240))
    assert page.status == 401, page
    assert "401 Authorization Required" in page.text, page.text
    assert "Alerts" not in page.text, page.text  # nothing of Prometheus's


@pytest.mark.usefixtures("_prometheus_answers")
def test_with_credentials_prometheus_alerts_page_lists_the_shipped_rules(
    proxy, credentials, alert_names
):
    assert "MailworkerWorkerDown" in alert_names, alert_names
    url = f"{proxy}/prometheus/classic/alerts"
    page, _ = browse(url, "prometheus-alerts", credentials, until=alert_names, window=(1280, 860))
    assert page.status == 200, page.text
    # Shown, not only somewhere in the markup: each rule's row reads "NAME (N active)".
    for name in alert_names:
        assert re.search(rf"\b{name} \(\d+ active\)", page.text), f"{name}:\n{page.text}"
