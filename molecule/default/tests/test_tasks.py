"""A real task through the deployed stack: send over SMTP, then sync the mailbox over IMAP.

The test mail servers (prepare.yml) run on loopback in the same container: the SMTP sink
delivers into the INBOX that Dovecot serves, so the synced message is the one the worker sent.
"""

from __future__ import annotations

import uuid

import pytest
from conftest import send_email, send_task

SYNC = "mailworker.tasks.sync.sync_mailbox"

pytestmark = pytest.mark.units(
    "celery-worker.service", "celery-worker@io.service", "test-smtp.service"
)


def test_send_then_sync_through_broker_workers_smtp_imap_and_postgresql(host, account):
    subject = f"verify {uuid.uuid4().hex}"
    message = {"to": ["bob@example.test"], "subject": subject, "body": "sent by molecule verify"}

    sent = send_email(host, account, message, "--wait", "90")
    assert sent["state"] == "SUCCESS", sent
    assert sent["result"]["status"] == "sent"
    assert sent["result"]["accepted"] == 1  # counts only: no addresses in results

    synced = send_task(host, SYNC, account.args(), wait=90)
    assert synced["state"] == "SUCCESS", synced
    assert synced["result"]["stored"] >= 1

    query = (
        "SELECT count(*) FROM messages "
        f"WHERE account_id = '{account.account_id}' AND subject = '{subject}'"
    )
    stored = host.run(f'runuser -u postgres -- psql -d mailworker -Atc "{query}"')
    assert stored.stdout.strip() == "1", stored.stdout + stored.stderr


def test_a_malformed_task_fails_at_once_with_a_clear_reason(host, account):
    result = send_task(host, SYNC, [account.tenant_id, "not-a-uuid", account.account_id], wait=60)
    assert result["state"] == "FAILURE"
    assert "user_id" in result["result"]
