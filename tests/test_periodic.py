"""The periodic work: beat fans out one sync per active account; cleanup marks stuck state; the
beat heartbeat that `mailworker health beat` reads."""

import re
import subprocess
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from celery.utils.nodenames import host_format
from mailworker.db.models import (
    FolderSyncState,
    MailAccount,
    Message,
    SentMessage,
    TaskAttempt,
    Tenant,
    User,
)
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from tests.fixtures.servers import MAILWORKER, celery_client, wait_until

pytestmark = pytest.mark.slow

CLEANUP = "mailworker.tasks.periodic.cleanup_stale_tasks"
FAN_OUT = "mailworker.tasks.periodic.sync_all_accounts"


def stored(db_engine, account_id: str) -> int:
    with Session(db_engine) as session:
        return len(
            session.scalars(select(Message.id).where(Message.account_id == account_id)).all()
        )


def health_beat(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [MAILWORKER, "health", "beat", "--timeout", "2", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_beat_fans_out_one_sync_per_active_account(fleet, make_account, dovecot, tmp_path):
    active = [make_account(), make_account()]
    dormant = make_account()
    for account in [*active, dormant]:
        dovecot.deliver(account.address, b"Subject: waiting\r\n\r\nfor the periodic sync\r\n")
    with Session(fleet.db_engine) as session, session.begin():
        session.execute(update(User).where(User.id == dormant.user_id).values(active=False))

    fleet.configure(
        MAILWORKER_SYNC_INTERVAL="3",
        MAILWORKER_BEAT_MAX_LOOP_INTERVAL="1",
        MAILWORKER_BEAT_LEASE="2",
        MAILWORKER_BEAT_HEARTBEAT_MAX_AGE="5",
    )
    worker = fleet.start_worker()
    start = time.time()
    assert health_beat(fleet.env).returncode == 1  # no beat yet, no heartbeat
    beat = fleet.start_beat(tmp_path)
    for account in active:
        wait_until(
            lambda account=account: stored(fleet.db_engine, account.account_id) == 1,
            40,
            f"the periodic sync of {account.address}\n{beat.log[-1500:]}\n{worker.log[-1500:]}",
        )
    with Session(fleet.db_engine) as session:
        assert session.get(FolderSyncState, (dormant.account_id, "INBOX")) is None
        fan_outs = session.scalars(
            select(TaskAttempt).where(TaskAttempt.task_name == FAN_OUT)
        ).all()
    assert fan_outs, "sync_all_accounts never ran"
    assert "Scheduler: Sending due task sync-all-accounts" in beat.log
    # The claimed time of each run, which molecule/fleet's fencing check reads.
    claimed = re.findall(
        r"beat \S+ claimed the run of sync-all-accounts at ([0-9.]+)$", beat.log, re.M
    )
    assert claimed, beat.log[-1500:]
    assert all(start < float(at) < time.time() for at in claimed), claimed

    ok = health_beat(beat.env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.startswith(f"ok: beat {host_format(beat.node)} leads (lease ")

    beat.stop()
    time.sleep(2.5)
    stale = health_beat(beat.env, "--max-age", "2")
    assert stale.returncode == 1
    assert stale.stdout.startswith(f"unhealthy: beat {host_format(beat.node)} last ticked ")


def test_fan_out_counts_only_active_accounts(app_env, shared_worker, make_account, db_engine):
    make_account()
    client = celery_client(app_env)
    value = client.send_task(FAN_OUT).get(timeout=30)
    with Session(db_engine) as session:
        expected = len(
            session.execute(
                select(MailAccount.id)
                .join(Tenant, Tenant.id == MailAccount.tenant_id)
                .join(User, User.id == MailAccount.user_id)
                .where(MailAccount.active, Tenant.active, User.active)
            ).all()
        )
    assert value == {"queued": expected}


def test_cleanup_marks_stuck_state_and_expires_stray_results(
    app_env, shared_worker, make_account, db_engine, redis_server
):
    account = make_account()
    long_ago = datetime.now(UTC) - timedelta(hours=2)
    very_long_ago = datetime.now(UTC) - timedelta(days=30)
    lost_task, old_task = str(uuid.uuid4()), str(uuid.uuid4())
    stuck_message = f"<{uuid.uuid4()}@stuck>"
    # Stuck before its final ".": nothing was delivered, so the sweeper sends it again.
    undelivered = f"<{uuid.uuid4()}@stuck-before-data>"
    with Session(db_engine) as session, session.begin():
        session.add(
            TaskAttempt(task_id=lost_task, task_name="x", state="started", started_at=long_ago)
        )
        session.add(
            TaskAttempt(
                task_id=old_task,
                task_name="x",
                state="succeeded",
                started_at=very_long_ago,
                finished_at=very_long_ago,
            )
        )
        session.add(
            SentMessage(
                tenant_id=account.tenant_id,
                account_id=account.account_id,
                message_id=stuck_message,
                status="sending",
                recipients=[],
                subject="",
                attempts=1,
                data_sent_at=long_ago,
                copied_to_sent=False,
                updated_at=long_ago,
            )
        )
        session.add(
            SentMessage(
                tenant_id=account.tenant_id,
                user_id=account.user_id,
                account_id=account.account_id,
                message_id=undelivered,
                status="sending",
                content=b"From: a@b\r\n\r\nstored\r\n",
                recipients=[],
                subject="",
                attempts=1,
                copied_to_sent=False,
                updated_at=long_ago,
            )
        )
    results = redis_server.client(db=1)
    stray = f"celery-task-meta-{uuid.uuid4()}"
    results.set(stray, b'{"status": "SUCCESS"}')
    assert results.ttl(stray) == -1

    value = celery_client(app_env).send_task(CLEANUP).get(timeout=30)
    assert value["attempts_marked_lost"] >= 1
    assert value["sends_marked_unknown"] >= 1
    assert value["sends_requeued"] >= 1
    assert value["attempts_purged"] >= 1
    assert value["results_given_expiry"] >= 1
    with Session(db_engine) as session:
        lost = session.scalar(select(TaskAttempt).where(TaskAttempt.task_id == lost_task))
        assert (lost.state, lost.error) == ("lost", "worker lost; no result")
        gone = session.scalar(select(TaskAttempt).where(TaskAttempt.task_id == old_task))
        assert gone is None
        stuck = session.scalar(select(SentMessage).where(SentMessage.message_id == stuck_message))
        assert stuck.status == "unknown"
        again = session.scalar(select(SentMessage).where(SentMessage.message_id == undelivered))
        assert (again.status, again.attempts) == ("deferred", 1)
        assert "sent again" in again.error
        assert again.next_attempt_at is not None
    assert 0 < results.ttl(stray) <= 3600
