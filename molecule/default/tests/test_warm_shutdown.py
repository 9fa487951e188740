"""`systemctl stop celery-worker` while a task runs: the task finishes, nothing is lost.

The task is a send to slow@example.test, which the test SMTP sink holds 20 s, published to a queue
that only celery-worker.service consumes (the instances take send and sync), so the main worker
is inside the SMTP exchange when the stop begins.
"""

from __future__ import annotations

import json
import re
import time
import uuid

import pytest
from conftest import mailworker_json, send_email

SLOW_SECONDS = 20
STARTED_WITHIN = 60

pytestmark = pytest.mark.units("celery-worker.service", "test-smtp.service")


def queues(host, env_file: str) -> set[str]:
    match = re.search(r'MAILWORKER_QUEUES="([^"]*)"', host.file(env_file).content_string)
    return set(match.group(1).split(",")) if match else set()


def main_worker_only_queue(host) -> str:
    others: set[str] = set()
    for path in host.run("ls /etc/mailworker/celery-worker@*.env").stdout.split():
        others |= queues(host, path)
    only_main = sorted(queues(host, "/etc/mailworker/celery-worker.env") - others)
    assert only_main, "every queue of celery-worker.service is also consumed by an instance"
    return only_main[0]


def wait_for_smtp_session(host) -> None:
    deadline = time.monotonic() + STARTED_WITHIN
    while time.monotonic() < deadline:
        if host.run("ss -Htn state established '( dport = :2525 )'").stdout.strip():
            return
        time.sleep(0.5)
    pytest.fail(f"the send task did not reach the SMTP server within {STARTED_WITHIN} s")


def test_stopping_the_worker_lets_the_running_task_finish(host, account):
    queue = main_worker_only_queue(host)
    subject = f"warm {uuid.uuid4().hex}"
    message = {"to": ["slow@example.test"], "subject": subject, "body": "held by the sink"}
    sent = send_email(host, account, message, "--queue", queue)
    try:
        wait_for_smtp_session(host)

        started = time.monotonic()
        stop = host.run("systemctl stop celery-worker.service")
        took = time.monotonic() - started
        assert stop.rc == 0, stop.stderr
        assert took > SLOW_SECONDS / 4, f"stop took {took:.1f} s: the task was not waited for"

        journal = host.run("journalctl -u celery-worker.service -n 30 --no-pager").stdout
        assert "Warm shutdown" in journal
        assert "Result: timeout" not in journal
        assert "SIGKILL" not in journal

        status = mailworker_json(host, "task", "status", sent["id"])
        assert status["state"] == "SUCCESS", json.dumps(status)
        delivered = host.run(f"grep -rl {subject!r} /srv/testmail/mail/alice@example.test/new")
        assert delivered.stdout.strip(), "the message never reached the SMTP sink"
    finally:
        host.run("systemctl start celery-worker.service")
    assert host.service("celery-worker.service").is_running
