"""The retry policy of tasks/base.py against real servers: retry windows in time at the default
settings, a retry that Redis refuses to queue is not dropped, and a task that takes its worker
down is redelivered a bounded number of times.

app_env shortens backoff, retries and the visibility timeout; the window tests drop those keys
so the worker runs with the defaults users get.
"""

import os
import socket
import threading
import time
from pathlib import Path

import pytest
from mailworker.db.models import MailAccount, TaskAttempt
from mailworker.settings import load_settings
from mailworker.tasks.base import FIRST_ATTEMPT_HEADER
from sqlalchemy import update
from sqlalchemy.orm import Session

from tests.fixtures.servers import IncludingWorker, attempts, free_port, wait_until

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
SYNC = "mailworker.tasks.sync.sync_mailbox"
KILL_OWN_PROCESS = "tests.redelivery.kill_own_process"
# What app_env shortens for retries (and what must move with them: the visibility timeout has to
# stay above the longest retry delay, the stale age above the visibility timeout).
SHORTENED_RETRY_SETTINGS = (
    "MAILWORKER_RETRY_BACKOFF_BASE",
    "MAILWORKER_RETRY_BACKOFF_MAX",
    "MAILWORKER_MAX_RETRIES",
    "MAILWORKER_VISIBILITY_TIMEOUT",
    "MAILWORKER_STALE_AFTER",
)
# Redis delivers an unacknowledged task again after the visibility timeout; keep it short.
FAST_REDELIVERY = {
    "MAILWORKER_TIME_LIMIT": "8",
    "MAILWORKER_SOFT_TIME_LIMIT": "6",
    "MAILWORKER_VISIBILITY_TIMEOUT": "10",
    "MAILWORKER_STALE_AFTER": "30",
    # The mail deadlines must end below the soft limit (a settings cross-check).
    "MAILWORKER_IMAP_DEADLINE": "5.5",
    "MAILWORKER_SMTP_DEADLINE": "5",
    "MAILWORKER_SMTP_FINAL_REPLY_TIMEOUT": "4",
}


def finished(db_engine, task_id: str, count: int, timeout: float = 30) -> list[TaskAttempt]:
    return wait_until(
        lambda: (
            (rows := attempts(db_engine, task_id))
            and len([a for a in rows if a.state != "started"]) >= count
            and rows
        ),
        timeout,
        f"{count} finished attempt(s) of {task_id}",
    )


@pytest.fixture
def default_retries(fleet):
    """The fleet with the application's default retry settings."""
    for name in SHORTENED_RETRY_SETTINGS:
        fleet.env.pop(name, None)
    return fleet


# --- retry windows at the default settings -----------------------------------------------------


def test_two_minute_outage_is_still_retried_at_defaults(default_retries, make_account):
    """Five retries at the default backoff are spent in about a minute; the window is not."""
    account = make_account(imap_port=free_port())  # nothing listens: the IMAP server is down
    worker = default_retries.start_worker()
    two_minutes_ago = time.time() - 120
    result = default_retries.client().send_task(
        SYNC, args=account.ids, retries=5, headers={FIRST_ATTEMPT_HEADER: two_minutes_ago}
    )
    [row] = finished(default_retries.db_engine, result.id, 1)
    assert (row.state, row.retries) == ("retrying", 5), (row.error, worker.log[-2000:])
    assert "refused the connection" in row.error
    window = load_settings(default_retries.env).retry_window
    assert "retry 6 in " in worker.log
    assert f"of its {window} s retry window)" in worker.log
    result.revoke()


def test_task_past_its_window_fails_clearly_at_defaults(default_retries, make_account):
    account = make_account(imap_port=free_port())
    worker = default_retries.start_worker()
    window = load_settings(default_retries.env).retry_window
    result = default_retries.client().send_task(
        SYNC, args=account.ids, headers={FIRST_ATTEMPT_HEADER: time.time() - window - 5}
    )
    error = result.get(timeout=30, propagate=False)
    assert type(error).__name__ == "TransientError", repr(error)
    assert str(error).startswith("gave up after 1 attempt over "), str(error)
    assert "refused the connection" in str(error)
    elapsed = int(str(error).split(" over ")[1].split(" s:")[0])
    assert window + 5 <= elapsed < window + 30
    [row] = finished(default_retries.db_engine, result.id, 1)
    assert (row.state, row.error) == ("failed", str(error))
    assert f"task {result.id} failed: gave up after 1 attempt" in worker.log


def test_a_retry_outlives_the_expiry_of_the_run_that_queued_it(default_retries, make_account):
    """sync_all_accounts queues each sync with `expires` (its interval) and beat does the same
    for the periodic tasks; Celery would copy that into the retry, and a worker drops a retry
    landing after it as revoked, with nothing recorded. The retry window governs instead."""
    account = make_account(imap_port=free_port())
    default_retries.configure(MAILWORKER_RETRY_JITTER="false")  # a predictable countdown
    worker = default_retries.start_worker()
    # Retry 4 waits 2 s x 2^3 = 16 s: past the 8 s the task was given.
    result = default_retries.client().send_task(SYNC, args=account.ids, retries=3, expires=8)
    rows = finished(default_retries.db_engine, result.id, 2, timeout=45)
    assert [(row.retries, row.state) for row in rows[:2]] == [(3, "retrying"), (4, "retrying")], (
        [(row.retries, row.state, row.error) for row in rows],
        worker.log[-2000:],
    )
    assert "Discarding revoked task" not in worker.log
    result.revoke()


def test_retries_carry_the_first_attempt_and_stop_at_the_window(fleet, make_account):
    """Each retry carries the first attempt's time; the last retry lands inside the window."""
    account = make_account(imap_port=free_port())
    fleet.configure(MAILWORKER_RETRY_WINDOW="5", MAILWORKER_RETRY_JITTER="false")
    fleet.start_worker()
    result = fleet.client().send_task(SYNC, args=account.ids)
    error = result.get(timeout=30, propagate=False)
    assert "gave up after" in str(error), repr(error)
    rows = attempts(fleet.db_engine, result.id)
    assert [a.state for a in rows] == ["retrying"] * (len(rows) - 1) + ["failed"]
    assert len(rows) >= 3  # delays of 1, 2, then what is left of the 5 s
    span = (rows[-1].started_at - rows[0].started_at).total_seconds()
    assert 4 <= span < 7, span
    assert f"gave up after {len(rows)} attempts over " in rows[-1].error


# --- a retry that Redis refuses to queue -------------------------------------------------------


class SilentServer:
    """Accepts TCP connections and never says a word, like an IMAP server that hangs."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connected = threading.Event()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.sockets.append(client)
            self.connected.set()

    def close(self) -> None:
        for sock in [self.listener, *self.sockets]:
            sock.close()


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_retry_refused_by_a_full_redis_is_not_dropped(
    pool, fleet, make_account, dovecot, redis_server
):
    silent = SilentServer()
    account = make_account(imap_port=silent.port)
    dovecot.deliver(account.address, b"Subject: kept through a full Redis\r\n\r\nhello\r\n")
    fleet.configure(**FAST_REDELIVERY, MAILWORKER_POOL=pool)
    worker = fleet.start_worker()
    broker = redis_server.client(int(fleet.env["MAILWORKER_BROKER_URL"].rpartition("/")[2]))
    admin = redis_server.client()
    result = fleet.client().send_task(SYNC, args=account.ids)
    try:
        assert silent.connected.wait(20), worker.log[-2000:]
        # The sync waits for the IMAP greeting (5 s timeout); Redis fills up meanwhile.
        admin.config_set("maxmemory", "1")
        wait_until(lambda: "Couldn't reject" in worker.log, 20, "the failed requeue")
        assert "its retry could not be queued" in worker.log
        time.sleep(1)
        assert broker.hlen("unacked") == 1  # still Redis' to deliver again, not acknowledged
        assert worker.process.poll() is None, worker.log[-3000:]  # the worker survived
    finally:
        admin.config_set("maxmemory", "0")
        silent.close()
    with Session(fleet.db_engine) as session, session.begin():
        session.execute(
            update(MailAccount)
            .where(MailAccount.id == account.account_id)
            .values(imap_port=dovecot.port)
        )
    assert result.get(timeout=60)["stored"] == 1, worker.log[-3000:]
    rows = attempts(fleet.db_engine, result.id)
    assert [(a.state, a.redelivered) for a in rows] == [
        ("retrying", False),
        ("succeeded", True),
    ], [(a.state, a.error) for a in rows]
    assert "retry not queued: " in rows[0].error
    assert "command not allowed when used memory > 'maxmemory'" in rows[0].error
    assert worker.process.poll() is None  # putting the message back did not stop the worker


# --- bounded redelivery after a killed worker --------------------------------------------------


@pytest.fixture
def killing_worker(fleet, tmp_path):
    env = {
        **fleet.env,
        "MAILWORKER_NODE_NAME": f"redelivery-{os.getpid()}@%h",
        "MAILWORKER_LOG_FILE": str(tmp_path / "worker.log"),
        "MAILWORKER_POOL": "prefork",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    worker = IncludingWorker(
        env, tmp_path / "worker.log", env["MAILWORKER_NODE_NAME"], include="tests.redelivery_tasks"
    )
    worker.start()
    yield worker
    worker.stop()


def test_task_that_kills_its_worker_fails_after_the_bound(fleet, killing_worker):
    bound = load_settings(killing_worker.env).max_redeliveries
    result = fleet.client().send_task(KILL_OWN_PROCESS, queue="periodic")
    error = result.get(timeout=90, propagate=False)
    assert type(error).__name__ == "PermanentError", (error, killing_worker.log[-3000:])
    assert f"its worker was lost {bound + 1} times" in str(error)
    time.sleep(2)  # nothing runs it again
    rows = attempts(fleet.db_engine, result.id)
    assert [a.state for a in rows] == ["started"] * (bound + 1) + ["failed"]
    assert [a.redelivered for a in rows] == [False] + [True] * (bound + 1)
    assert rows[-1].error == str(error)
    assert f"task {result.id} failed: {KILL_OWN_PROCESS} not run again" in killing_worker.log
