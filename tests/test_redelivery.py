"""kill -9 a worker in the middle of a task, start another, and the task's effects happen once;
leases keep a live worker's long task and bring a dead worker's task back in the promised time.

Each test runs its workers on broker databases of their own (isolated_env). The first tests use a
short visibility timeout, so Redis hands the killed worker's task to the new worker within
seconds; the lease tests run at the application's defaults.
The kill lands at a known point: a TCP proxy that stops forwarding IMAP traffic mid-sync, and an
SMTP relay that holds the DATA reply.
"""

import asyncio
import contextlib
import json
import os
import select
import signal
import socket
import threading
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import redis
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult
from celery.utils.nodenames import host_format
from mailworker.db.models import FolderSyncState, MailAccount, Message, SentMessage, TaskAttempt
from mailworker.mail.imap import ImapSession
from mailworker.settings import load_settings
from sqlalchemy import func, update
from sqlalchemy import select as sql_select
from sqlalchemy.orm import Session

from tests.fixtures.outbox import submit
from tests.fixtures.servers import free_port, wait_until

pytestmark = pytest.mark.slow

SYNC = "mailworker.tasks.sync.sync_mailbox"
# Redis redelivers after VISIBILITY_TIMEOUT once the worker stops renewing leases (every 2 s here).
FAST_REDELIVERY = {
    "MAILWORKER_TIME_LIMIT": "8",
    "MAILWORKER_SOFT_TIME_LIMIT": "6",
    "MAILWORKER_VISIBILITY_TIMEOUT": "10",
    "MAILWORKER_STALE_AFTER": "30",
    "MAILWORKER_IMAP_TIMEOUT": "30",
    "MAILWORKER_SMTP_TIMEOUT": "30",
    "MAILWORKER_IMAP_DEADLINE": "5.5",  # below the soft limit (a settings cross-check)
    "MAILWORKER_SMTP_DEADLINE": "5",
    "MAILWORKER_SMTP_FINAL_REPLY_TIMEOUT": "4",
}


class HoldingProxy:
    """A loopback TCP proxy that can stop forwarding, as a stalled network would."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.holding = threading.Event()
        self.closed = threading.Event()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            self.sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()

    def _pump(self, client: socket.socket, server: socket.socket) -> None:
        with contextlib.suppress(OSError, ValueError):
            while not self.closed.is_set():
                if self.holding.is_set():
                    time.sleep(0.05)
                    continue
                ready, _, _ = select.select([client, server], [], [], 0.05)
                for source in ready:
                    data = source.recv(65536)
                    if not data:
                        return
                    (server if source is client else client).sendall(data)

    def hold(self) -> None:
        self.holding.set()

    def close(self) -> None:
        self.closed.set()
        for sock in [self.listener, *self.sockets]:
            with contextlib.suppress(OSError):
                sock.close()


def attempts(db_engine, task_id: str) -> list[TaskAttempt]:
    with Session(db_engine) as session:
        query = (
            sql_select(TaskAttempt)
            .where(TaskAttempt.task_id == task_id)
            .order_by(TaskAttempt.started_at)
        )
        return list(session.scalars(query))


def count_messages(db_engine, account_id: str) -> int:
    with Session(db_engine) as session:
        query = sql_select(func.count()).select_from(Message)
        return session.scalar(query.where(Message.account_id == account_id))


@pytest.fixture
def proxy(dovecot):
    holding = HoldingProxy(dovecot.port)
    yield holding
    holding.close()


def test_sync_killed_mid_mailbox_resumes_without_duplicates(fleet, make_account, dovecot, proxy):
    total = 150
    account = make_account(imap_port=proxy.port)
    with ImapSession(dovecot.endpoint(account.address)) as imap:
        for number in range(total):
            imap.append("INBOX", f"Subject: m{number}\r\n\r\nbody {number}\r\n".encode())
    # One run must finish the mailbox after the kill (the result counts that run's messages), so
    # the shipped time limits and mail deadlines: FAST_REDELIVERY's 6 s is outlasted by 138
    # one-message batches on a loaded machine (a retry stores the rest, and counts only those).
    fleet.configure(
        MAILWORKER_VISIBILITY_TIMEOUT=FAST_REDELIVERY["MAILWORKER_VISIBILITY_TIMEOUT"],
        MAILWORKER_SYNC_BATCH_SIZE="1",
        MAILWORKER_CONCURRENCY="1",
    )
    db_engine = fleet.db_engine
    first = fleet.start_worker()
    client = fleet.client()

    result = client.send_task(SYNC, args=account.ids)
    wait_until(lambda: count_messages(db_engine, account.account_id) >= 10, 30, "a few batches")
    proxy.hold()  # the sync now waits on IMAP with some batches stored
    time.sleep(0.3)
    stored_before_kill = count_messages(db_engine, account.account_id)
    assert 0 < stored_before_kill < total, "the sync finished before the kill; use more mail"
    first.kill_hard()
    proxy.close()

    # The new worker reaches Dovecot directly; Redis redelivers after the visibility timeout.
    _point_account_at(db_engine, account.account_id, dovecot.port)
    second = fleet.start_worker()
    value = result.get(timeout=60)
    assert value["stored"] == total - stored_before_kill, (value, second.log[-2000:])

    with Session(db_engine) as session:
        uids = session.scalars(
            sql_select(Message.uid).where(Message.account_id == account.account_id)
        ).all()
        state = session.get(FolderSyncState, (account.account_id, "INBOX"))
    assert len(uids) == len(set(uids)) == total
    assert state.last_uid == max(uids)
    runs = [(a.state, a.redelivered) for a in attempts(db_engine, result.id)]
    assert runs == [("started", False), ("succeeded", True)]


def _point_account_at(db_engine, account_id: str, port: int) -> None:
    with Session(db_engine) as session, session.begin():
        session.execute(
            update(MailAccount).where(MailAccount.id == account_id).values(imap_port=port)
        )


class HoldingRelay:
    """An SMTP server that takes any login, delivers to Dovecot on DATA and then waits `hold`
    seconds before it replies, as an MTA that committed the message to its queue: a worker
    killed while it waits has handed over the message but never heard so. With `hold_rcpt` it
    also waits that long before its reply to the first RCPT, before any data went out; with
    `hold_quit` before its reply to QUIT, after it accepted the message."""

    def __init__(
        self, dovecot: Any, hold: float, hold_rcpt: float = 0.0, hold_quit: float = 0.0
    ) -> None:
        self.dovecot = dovecot
        self.hold = hold
        self.hold_rcpt = hold_rcpt
        self.hold_quit = hold_quit
        self.in_rcpt = threading.Event()
        self.in_data = threading.Event()
        self.in_quit = threading.Event()
        self.data_commands = 0
        self.controller = Controller(
            self,
            hostname="127.0.0.1",
            port=free_port(),
            authenticator=lambda *_: AuthResult(success=True),
            auth_require_tls=False,
        )

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options) -> str:
        if not self.in_rcpt.is_set():
            self.in_rcpt.set()
            await asyncio.sleep(self.hold_rcpt)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope) -> str:
        self.data_commands += 1
        loop = asyncio.get_running_loop()
        for rcpt in envelope.rcpt_tos:
            deliver = partial(self.dovecot.deliver, rcpt, envelope.original_content)
            await loop.run_in_executor(None, deliver)
        self.in_data.set()
        await asyncio.sleep(self.hold)
        return "250 2.0.0 accepted"

    async def handle_QUIT(self, server, session, envelope) -> str:
        self.in_quit.set()
        await asyncio.sleep(self.hold_quit)
        return "221 Bye"


@pytest.fixture
def holding_relay(dovecot):
    """HoldingRelay(dovecot, hold, hold_rcpt, hold_quit), started; stopped after the test."""
    started: list[HoldingRelay] = []

    def start(hold: float, hold_rcpt: float = 0.0, hold_quit: float = 0.0) -> HoldingRelay:
        started.append(HoldingRelay(dovecot, hold=hold, hold_rcpt=hold_rcpt, hold_quit=hold_quit))
        started[-1].controller.start()
        return started[-1]

    yield start
    for relay in started:
        relay.controller.stop()


def outbox_rows(db_engine, account_id: str) -> list[SentMessage]:
    with Session(db_engine) as session:
        return list(
            session.scalars(sql_select(SentMessage).where(SentMessage.account_id == account_id))
        )


def test_send_killed_inside_smtp_is_not_sent_twice(fleet, make_account, dovecot, holding_relay):
    relay = holding_relay(hold=2.0)
    alice = make_account(smtp_port=relay.controller.port, smtp_security="plain")
    bob = make_account()
    fleet.configure(**FAST_REDELIVERY, MAILWORKER_CONCURRENCY="1")
    db_engine = fleet.db_engine
    first = fleet.start_worker()
    client = fleet.client()

    message = {"to": [bob.address], "subject": "quarterly report", "body": "attached"}
    _, result = submit(load_settings(fleet.env), client, alice, message)
    assert result is not None
    assert relay.in_data.wait(30), first.log[-2000:]
    first.kill_hard()  # the message is delivered; its 250 goes to a dead connection
    assert len(dovecot.mailbox(bob.address)) == 1

    second = fleet.start_worker()
    error = result.get(timeout=60, propagate=False)
    assert result.state == "FAILURE", error
    assert "was NOT resent" in str(error), second.log[-2000:]
    assert relay.data_commands == 1
    time.sleep(1)
    assert len(dovecot.mailbox(bob.address)) == 1

    rows = outbox_rows(db_engine, alice.account_id)
    assert [(row.status, row.attempts) for row in rows] == [("unknown", 1)]
    runs = [(a.state, a.redelivered) for a in attempts(db_engine, result.id)]
    assert runs == [("started", False), ("failed", True)]


def send_then_kill(
    fleet: Any, make_account: Any, relay: HoldingRelay, held: threading.Event
) -> tuple[Any, Any, Any]:
    """Queue a send from a new account on `relay` to another one, with one worker of
    FAST_REDELIVERY settings, and kill the worker hard once the relay sets `held`;
    (sender, recipient, the task's AsyncResult)."""
    alice = make_account(smtp_port=relay.controller.port, smtp_security="plain")
    bob = make_account()
    fleet.configure(**FAST_REDELIVERY, MAILWORKER_CONCURRENCY="1")
    worker = fleet.start_worker()
    message = {"to": [bob.address], "subject": "minutes", "body": "see you"}
    _, result = submit(load_settings(fleet.env), fleet.client(), alice, message)
    assert result is not None
    assert held.wait(30), worker.log[-2000:]
    worker.kill_hard()
    return alice, bob, result


def test_send_killed_before_its_data_went_out_is_sent_once(
    fleet, make_account, dovecot, holding_relay
):
    """A worker killed before the final "." delivered nothing: the redelivered task sends it
    (before, every send killed anywhere in the exchange was `unknown`, i.e. lost)."""
    rcpt_relay = holding_relay(hold=0.0, hold_rcpt=30.0)
    # Killed waiting for the RCPT reply: nothing went out.
    alice, bob, result = send_then_kill(fleet, make_account, rcpt_relay, rcpt_relay.in_rcpt)
    assert dovecot.mailbox(bob.address) == []

    second = fleet.start_worker()
    value = result.get(timeout=60)
    assert (value["status"], value["duplicate"]) == ("sent", False), second.log[-2000:]
    assert "was lost before the message data went out" in second.log
    assert rcpt_relay.data_commands == 1
    assert len(dovecot.mailbox(bob.address)) == 1
    [row] = outbox_rows(fleet.db_engine, alice.account_id)
    assert (row.status, row.attempts, row.copied_to_sent) == ("sent", 2, True)
    assert row.data_sent_at is not None
    runs = [(a.state, a.redelivered) for a in attempts(fleet.db_engine, result.id)]
    assert runs == [("started", False), ("succeeded", True)]


def test_send_killed_after_the_servers_acceptance_is_sent_not_unknown(
    fleet, make_account, dovecot, holding_relay
):
    """A worker killed after the server's 250 (here while the server holds its reply to QUIT)
    has committed `sent`: the redelivered task sends nothing and makes the one Sent copy (before,
    `sent` was committed after QUIT, and the fleet's kill -9 under load left such a send
    `unknown`). With SMTP connection reuse off: a kept connection gets no QUIT after its send,
    but one that is not kept (reuse off, its message limit reached, the cache full) does."""
    fleet.configure(MAILWORKER_SMTP_IDLE_REUSE="0")
    quit_relay = holding_relay(hold=0.0, hold_quit=30.0)
    # Killed once the server accepted the message, its reply to QUIT pending.
    alice, bob, result = send_then_kill(fleet, make_account, quit_relay, quit_relay.in_quit)
    [row] = outbox_rows(fleet.db_engine, alice.account_id)
    assert (row.status, row.copied_to_sent) == ("sent", False), row.error

    second = fleet.start_worker()
    value = result.get(timeout=60)
    assert (value["status"], value["duplicate"], value["copied_to_sent"]) == ("sent", True, True)
    assert quit_relay.data_commands == 1, second.log[-2000:]
    assert len(dovecot.mailbox(bob.address)) == 1
    assert len(dovecot.mailbox(alice.address, "Sent")) == 1
    [row] = outbox_rows(fleet.db_engine, alice.account_id)
    assert (row.status, row.attempts, row.copied_to_sent) == ("sent", 1, True)


def test_an_overtaken_attempt_stops_before_the_final_dot(
    default_fleet, make_account, dovecot, holding_relay
):
    """An attempt that froze while another took the send over (its database session dropped,
    the lock with it) wakes up and stops before delivering: it neither sends, nor writes the
    row, nor stores a result (default settings)."""
    brief_rcpt_relay = holding_relay(hold=0.0, hold_rcpt=5.0)
    alice = make_account(smtp_port=brief_rcpt_relay.controller.port, smtp_security="plain")
    bob = make_account()
    fleet = default_fleet
    worker = fleet.start_worker()
    message = {"to": [bob.address], "subject": "agenda", "body": "monday"}
    _, result = submit(load_settings(fleet.env), fleet.client(), alice, message)
    assert result is not None
    assert brief_rcpt_relay.in_rcpt.wait(30), worker.log[-2000:]
    [row] = outbox_rows(fleet.db_engine, alice.account_id)
    assert (row.status, row.attempts) == ("sending", 1)
    with Session(fleet.db_engine) as session, session.begin():
        # What the claim of a later attempt writes.
        session.execute(
            update(SentMessage).where(SentMessage.id == row.id).values(attempts=2, task_id="x")
        )

    done = wait_until(
        lambda: [a for a in attempts(fleet.db_engine, result.id) if a.state != "started"],
        60,
        "the attempt to end",
    )
    assert [(a.state, a.redelivered) for a in done] == [("superseded", False)], worker.log[-2000:]
    assert "was overtaken" in done[0].error
    assert brief_rcpt_relay.data_commands == 0
    assert dovecot.mailbox(bob.address) == []
    [after] = outbox_rows(fleet.db_engine, alice.account_id)
    assert (after.status, after.attempts, after.data_sent_at) == ("sending", 2, None)
    assert result.state == "PENDING"  # Ignore: the result is the other attempt's to store


# --- leases, at the DEFAULT settings ---------------------------------------------------------
# A worker renews the lease of every task it holds (mailworker.redis_transport); a task whose
# lease is older than the visibility timeout goes back to its queue at the next restore sweep.

HOLD = "tests.redelivery.hold"
KILL_OWN_PROCESS_ONCE = "tests.redelivery.kill_own_process_once"
TASKS = "tests.redelivery_tasks"


def runs(client, key: str) -> list[dict[str, Any]]:
    return [json.loads(run) for run in client.lrange(key, 0, -1)]


def started(client, key: str, count: int, timeout: float) -> list[dict[str, Any]]:
    return wait_until(
        lambda: len(found := runs(client, key)) >= count and found,
        timeout,
        f"run {count} of {key}",
    )


def test_leases_keep_a_long_task_and_bring_back_a_killed_workers_task(default_fleet):
    """At the defaults: a task running longer than the visibility timeout on a live worker runs
    once; the task of a worker whose main process is killed with -9 runs again on another worker
    within visibility timeout + restore interval."""
    settings = load_settings(default_fleet.env)
    timeout, sweep = settings.visibility_timeout, settings.broker_restore_interval
    promised = timeout + sweep
    default_fleet.configure(MAILWORKER_CONCURRENCY="1")  # one task per worker, placed by hand
    workers = [default_fleet.start_worker(wait=False, include=TASKS) for _ in range(3)]
    for worker in workers:
        worker.wait_ready(60)
    by_node = {host_format(worker.node): worker for worker in workers}
    redis_client = redis.Redis.from_url(default_fleet.env["MAILWORKER_BROKER_URL"])
    client = default_fleet.client()
    run_id = uuid.uuid4().hex

    # Past the point where kombu alone (no lease) would have redelivered it, with margin.
    long_key, long_seconds = f"long-{run_id}", promised + 10
    long = client.send_task(HOLD, args=[long_key, long_seconds, 0], queue="periodic")
    holder = started(redis_client, long_key, 1, 30)[0]["node"]
    victim_key = f"victim-{run_id}"
    victim = client.send_task(HOLD, args=[victim_key, 3600, 0], queue="periodic")
    first = started(redis_client, victim_key, 1, 30)[0]
    assert first["node"] != holder
    doomed = by_node[first["node"]]

    killed_at = time.time()
    os.kill(doomed.process.pid, signal.SIGKILL)  # the main process only
    doomed.process.wait(10)
    time.sleep(1)
    # Celery's pool children die with their main process (PR_SET_PDEATHSIG): no orphan keeps
    # running the task, without a hard time limit, beside its redelivered copy.
    assert not _alive(first["pid"])
    doomed.process = None

    again = started(redis_client, victim_key, 2, promised + 30)[1]
    delay = again["at"] - killed_at
    print(
        f"\nkill -9 of the main process: the task ran again on {again['node']} after "
        f"{delay:.1f} s (promised <= {promised} s: visibility timeout {timeout} s + restore "
        f"sweep {sweep} s; lease renewed every {settings.broker_lease_interval} s)"
    )
    assert again["node"] != first["node"]
    assert again["redelivered"]
    # Not before the lease can have run out (last renewal at most one interval before the kill).
    assert timeout - settings.broker_lease_interval - 1 <= delay <= promised + 2
    assert victim.get(timeout=30) == 2

    assert long.get(timeout=long_seconds + 30) == 1
    time.sleep(sweep + 1)  # a sweep after the ack finds nothing of it
    long_runs = runs(redis_client, long_key)
    assert [run["node"] for run in long_runs] == [holder], long_runs
    assert redis_client.zcard("unacked_index") == 0
    logs = "\n".join(worker.log for worker in workers)
    assert "could not renew the leases" not in logs


def test_a_killed_pool_process_runs_its_task_again_at_once(default_fleet):
    """At the defaults: kill -9 of the pool child running a task (the OOM killer) hands the task
    back to Redis at once (task_reject_on_worker_lost), not after the visibility timeout."""
    worker = default_fleet.start_worker(include=TASKS)
    redis_client = redis.Redis.from_url(default_fleet.env["MAILWORKER_BROKER_URL"])
    key = f"child-{uuid.uuid4().hex}"
    result = default_fleet.client().send_task(KILL_OWN_PROCESS_ONCE, args=[key], queue="periodic")
    assert result.get(timeout=60) == 2, worker.log[-3000:]
    first, again = runs(redis_client, key)
    delay = again["at"] - first["at"]
    print(f"\nkill -9 of the pool child: the task ran again after {delay:.1f} s")
    assert again["redelivered"]
    assert again["pid"] != first["pid"]
    assert delay < 15  # a new pool process starts first; 1-5 s measured on 2 busy cores
    assert worker.process.poll() is None


def _alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie waiting to be reaped does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"
