"""`supervisorctl stop celery-worker` while a task runs: the task finishes, nothing is killed.

The task is a send to slow@example.test, which the test SMTP sink holds 20 s, published to a queue
that only celery-worker consumes (the instance takes send and sync), so the main worker is inside
the SMTP exchange when the stop begins. supervisor sends TERM to the main process only
(stopasgroup=false): Celery's warm shutdown lets the pool finish the send.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest
from conftest import APP_HOSTS, OUTPUT_DIR, mailworker_json, send_email, status, unit_settings

testinfra_hosts = APP_HOSTS
SLOW_SECONDS = 20
STARTED_WITHIN = 60
OUTPUT = f"{OUTPUT_DIR}/celery-worker.log"


def main_worker_only_queue(host) -> str:
    others: set[str] = set()
    for path in host.run("ls /etc/mailworker/celery-worker@*.env").stdout.split():
        program = path.rsplit("/", 1)[1].removesuffix(".env")
        others |= set(unit_settings(host, program)["MAILWORKER_QUEUES"].split(","))
    mine = set(unit_settings(host, "celery-worker")["MAILWORKER_QUEUES"].split(","))
    assert mine - others, "every queue of celery-worker is also consumed by an instance"
    return sorted(mine - others)[0]


def wait_for_smtp_session(host) -> None:
    deadline = time.monotonic() + STARTED_WITHIN
    while time.monotonic() < deadline:
        if host.run("ss -Htn state established '( dport = :2525 )'").stdout.strip():
            return
        time.sleep(0.5)
    pytest.fail(f"the send task did not reach the SMTP server within {STARTED_WITHIN} s")


def warm_shutdowns(host) -> int:
    """Celery says it on stderr: the program's output file (the journal under systemd)."""
    return host.file(OUTPUT).content_string.count("Warm shutdown")


def supervisord_log(host) -> list[str]:
    return host.file("/var/log/supervisor/supervisord.log").content_string.splitlines()


@pytest.mark.programs("celery-worker")
def test_stopping_the_worker_lets_the_running_task_finish(host, account):
    queue = main_worker_only_queue(host)
    subject = f"warm {uuid.uuid4().hex}"
    message = {"to": ["slow@example.test"], "subject": subject, "body": "held by the sink"}
    sent = send_email(host, account, message, "--queue", queue)
    try:
        wait_for_smtp_session(host)

        seen = len(supervisord_log(host))
        warm_before = warm_shutdowns(host)
        started = time.monotonic()
        stop = host.run("supervisorctl stop celery-worker")
        took = time.monotonic() - started
        assert stop.rc == 0, stop.stdout + stop.stderr
        assert "celery-worker: stopped" in stop.stdout
        assert took > SLOW_SECONDS / 4, f"stop took {took:.1f} s: the task was not waited for"

        assert warm_shutdowns(host) > warm_before, host.file(OUTPUT).content_string[-2000:]
        during = "\n".join(supervisord_log(host)[seen:])
        assert "SIGKILL" not in during, during
        assert "stopped: celery-worker (exit status 0)" in during, during

        state = mailworker_json(host, "task", "status", sent["id"])
        assert state["state"] == "SUCCESS", json.dumps(state)
        delivered = host.run(f"grep -rl {subject!r} /srv/testmail/mail/alice@example.test/new")
        assert delivered.stdout.strip(), "the message never reached the SMTP sink"
    finally:
        host.run("supervisorctl start celery-worker")
    assert status(host, "celery-worker") == "RUNNING"
