"""A Redis restart while a prefork task runs: the task is not cancelled and not run twice.

The broker is a redis-server of this test's own that keeps its data on disk (appendonly), as the
production one does, so the unacknowledged task survives the restart. The task is a real sync
whose IMAP traffic the test holds back while Redis restarts, so the restart lands mid-task.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from mailworker.db.models import Message, TaskAttempt
from mailworker.mail.imap import ImapSession
from mailworker.settings import load_settings
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tests.fixtures.servers import RedisServer, free_port, wait_until
from tests.fixtures.trickle import TricklingProxy

pytestmark = pytest.mark.slow

SYNC = "mailworker.tasks.sync.sync_mailbox"
TOTAL = 40


@pytest.fixture
def persistent_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), tmp_path, persistent=True)
    server.start()
    yield server
    server.stop()


def runs(db_engine, task_id: str) -> list[tuple[str, bool]]:
    with Session(db_engine) as session:
        query = select(TaskAttempt).where(TaskAttempt.task_id == task_id)
        return [(a.state, a.redelivered) for a in session.scalars(query.order_by("started_at"))]


def stored(db_engine, account_id: str) -> int:
    with Session(db_engine) as session:
        query = select(func.count()).select_from(Message)
        return session.scalar(query.where(Message.account_id == account_id))


def test_redis_restart_during_a_prefork_task_neither_cancels_nor_repeats_it(
    fleet, make_account, dovecot, persistent_redis
):
    with TricklingProxy(dovecot.port, interval=0) as proxy:
        account = make_account(imap_port=proxy.port)
        with ImapSession(dovecot.endpoint(account.address)) as imap:
            for number in range(TOTAL):
                imap.append("INBOX", f"Subject: m{number}\r\n\r\nbody {number}\r\n".encode())
        broker = f"redis://127.0.0.1:{persistent_redis.port}"
        fleet.configure(
            MAILWORKER_BROKER_URL=f"{broker}/0",
            MAILWORKER_RESULT_BACKEND=f"{broker}/1",
            MAILWORKER_POOL="prefork",
            MAILWORKER_CONCURRENCY="1",
            MAILWORKER_QUEUES="sync",
            MAILWORKER_SYNC_BATCH_SIZE="1",
            MAILWORKER_IMAP_TIMEOUT="10",  # the IMAP stall below must not end the task
        )
        worker = fleet.start_worker()
        result = fleet.client().send_task(SYNC, args=account.ids)
        wait_until(lambda: stored(fleet.db_engine, account.account_id) >= 3, 30, "a few batches")

        proxy.pause()  # the task now waits on IMAP, its message unacknowledged in Redis
        assert persistent_redis.client().hlen("unacked") == 1
        persistent_redis.stop()
        wait_until(lambda: "Connection to broker lost" in worker.log, 10, "the worker to notice")
        persistent_redis.start()
        proxy.resume()

        value = result.get(timeout=60)
    log = worker.log
    assert value["stored"] == TOTAL, log[-3000:]
    assert "Terminating" not in log, log[-3000:]
    assert runs(fleet.db_engine, result.id) == [("succeeded", False)], log[-3000:]
    assert stored(fleet.db_engine, account.account_id) == TOTAL
    # The ack after the reconnect reached Redis: nothing is left to redeliver.
    client = persistent_redis.client()
    wait_until(lambda: client.hlen("unacked") == 0, 10, "the ack to reach Redis")
    assert client.llen("sync") == 0


HOLD = "tests.redelivery.hold"


def test_a_task_waiting_for_its_countdown_through_a_redis_restart_still_runs_once(
    default_fleet, persistent_redis
):
    # At the defaults. On the connection loss Celery drops the requests it had not started (here
    # one waiting for its countdown, as a retry does) without telling the transport; the worker
    # must stop renewing their leases, so Redis redelivers them after the visibility timeout
    # instead of leaving them until the worker restarts.
    broker = f"redis://127.0.0.1:{persistent_redis.port}"
    default_fleet.configure(
        MAILWORKER_BROKER_URL=f"{broker}/0", MAILWORKER_RESULT_BACKEND=f"{broker}/1"
    )
    settings = load_settings(default_fleet.env)
    worker = default_fleet.start_worker(include="tests.redelivery_tasks")
    key = f"countdown-{uuid.uuid4().hex}"
    result = default_fleet.client().send_task(
        HOLD, args=[key, 0, 0], queue=settings.queues[0], countdown=5
    )
    client = persistent_redis.client()
    wait_until(lambda: client.hlen("unacked") == 1, 30, "the worker to take the task")

    persistent_redis.stop()
    wait_until(lambda: "Connection to broker lost" in worker.log, 10, "the worker to notice")
    persistent_redis.start()
    restarted = time.monotonic()

    # Back after the worker's wait (one visibility timeout after it reconnects) and one sweep.
    promised = settings.visibility_timeout + settings.broker_restore_interval
    assert result.get(timeout=promised + 60) == 1, worker.log[-3000:]
    delay = time.monotonic() - restarted
    print(f"\ncountdown task run {delay:.0f} s after the Redis restart (promised <= {promised} s)")
    assert delay <= promised + 15, worker.log[-3000:]
    assert "no longer held by this worker" in worker.log, worker.log[-3000:]
    assert client.llen(key) == 1  # once
    wait_until(lambda: client.hlen("unacked") == 0, 15, "the ack to reach Redis")
