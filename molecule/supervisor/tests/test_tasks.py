"""A real task through the stack under supervisor: send over SMTP, then sync the mailbox over IMAP.

The test mail servers run on the app host (prepare.yml); Redis and PostgreSQL on the data host.
"""

from __future__ import annotations

import uuid

import pytest
from conftest import APP_HOSTS, data_host, send_email, send_task

testinfra_hosts = APP_HOSTS
SYNC = "mailworker.tasks.sync.sync_mailbox"


@pytest.mark.programs("celery-worker@io")
def test_send_then_sync_through_broker_workers_smtp_imap_and_postgresql(host, account):
    subject = f"verify {uuid.uuid4().hex}"
    message = {"to": ["bob@example.test"], "subject": subject, "body": "sent under supervisor"}

    sent = send_email(host, account, message, "--wait", "90")
    assert sent["state"] == "SUCCESS", sent
    assert sent["result"]["status"] == "sent"

    synced = send_task(host, SYNC, account.args(), wait=90)
    assert synced["state"] == "SUCCESS", synced
    assert synced["result"]["stored"] >= 1

    query = (
        "SELECT count(*) FROM messages "
        f"WHERE account_id = '{account.account_id}' AND subject = '{subject}'"
    )
    stored = data_host().run(f'runuser -u postgres -- psql -d mailworker -Atc "{query}"')
    assert stored.stdout.strip() == "1", stored.stdout + stored.stderr
