"""`systemctl stop celery-worker` while a task runs: the task finishes, nothing is lost.

The io instance (which also consumes `send`) is stopped first so that the main worker takes the
task. A message to slow@example.test is held 20 s by the test SMTP sink, so the task is inside
its SMTP exchange when the stop begins.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest
from conftest import mailworker_json, send_task

SLOW_SECONDS = 20
STARTED_WITHIN = 60

pytestmark = pytest.mark.units("celery-worker.service", "test-smtp.service")


def wait_for_smtp_session(host) -> None:
    deadline = time.monotonic() + STARTED_WITHIN
    while time.monotonic() < deadline:
        if host.run("ss -Htn state established '( dport = :2525 )'").stdout.strip():
            return
        time.sleep(0.5)
    pytest.fail(f"the send task did not reach the SMTP server within {STARTED_WITHIN} s")


def test_stopping_the_worker_lets_the_running_task_finish(host, account):
    assert host.run("systemctl stop celery-worker@io.service").rc == 0
    try:
        subject = f"warm {uuid.uuid4().hex}"
        message = {"to": ["slow@example.test"], "subject": subject, "body": "held by the sink"}
        sent = send_task(host, "mailworker.tasks.send.send_email", [*account.args(), message])
        wait_for_smtp_session(host)

        started = time.monotonic()
        stop = host.run("systemctl stop celery-worker.service")
        took = time.monotonic() - started
        assert stop.rc == 0, stop.stderr
        assert took > SLOW_SECONDS / 4, (
            f"stop returned after {took:.1f} s: the task was not waited for"
        )

        journal = host.run("journalctl -u celery-worker.service -n 30 --no-pager").stdout
        assert "Warm shutdown" in journal
        assert "Result: timeout" not in journal
        assert "SIGKILL" not in journal

        status = mailworker_json(host, "task", "status", sent["id"])
        assert status["state"] == "SUCCESS", json.dumps(status)
        delivered = host.run(f"grep -rl {subject!r} /srv/testmail/mail/alice@example.test/new")
        assert delivered.stdout.strip(), "the message never reached the SMTP sink"
    finally:
        host.run("systemctl start celery-worker.service celery-worker@io.service")
    assert host.service("celery-worker.service").is_running
    assert host.service("celery-worker@io.service").is_running
