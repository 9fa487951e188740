"""The process-wide budget of mail bytes in flight (mail/memory_budget.py).

First the semaphore itself, with real threads: held bytes never exceed the budget, a reservation
larger than the budget runs alone, waiters go in arrival order and proceed when bytes are
released. Then syncs and a send against the real Dovecot, aiosmtpd and PostgreSQL at the
application's DEFAULT settings, except a budget of MAILWORKER_MAX_MESSAGE_SIZE (the smallest
allowed): with most of it taken, they wait before fetching or loading any message, then finish.

Not measured here: the peak memory of a 20-thread worker under the default budget (that is
benchmark work; docs/operations.md gives the arithmetic).
"""

from __future__ import annotations

import random
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from mailworker.db.models import Message, SentMessage
from mailworker.errors import ConfigurationError
from mailworker.mail.memory_budget import MemoryBudget, budget_for
from mailworker.services import outbox
from mailworker.services.access import owned_access
from mailworker.services.send import SEND_RESERVES_PER_BYTE, send
from mailworker.services.sync import sync_account
from mailworker.settings import Settings, load_settings
from sqlalchemy import event, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from tests.fixtures.servers import wait_until

MIB = 1024 * 1024


def run_in_thread(target: Any, *args: Any) -> tuple[threading.Thread, dict[str, Any]]:
    """Start `target(*args)` in a thread; the dict gets its "value" or "error"."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = target(*args)
        except BaseException as error:  # reported by the test, not lost in the thread
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def hold(budget: MemoryBudget, nbytes: int, release: threading.Event) -> int:
    with budget.reserve(nbytes) as held:
        release.wait(30)
        return held


# --- the semaphore -------------------------------------------------------------------------------


def test_concurrent_reservations_never_exceed_the_budget() -> None:
    budget = MemoryBudget(100)
    lock = threading.Lock()
    held_now = [0]
    most = [0]

    def worker(seed: int) -> None:
        draw = random.Random(seed)
        for _ in range(40):
            with budget.reserve(draw.randint(10, 60)) as held:
                with lock:  # counted apart from the budget's own bookkeeping
                    held_now[0] += held
                    most[0] = max(most[0], held_now[0])
                time.sleep(draw.random() / 1000)
                with lock:
                    held_now[0] -= held

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "a reservation never got its bytes"
    assert most[0] <= 100
    assert most[0] > 60  # several held at once: the test did exercise concurrency
    assert budget.high_water == most[0]
    assert (budget.in_use, budget.waiting) == (0, 0)


def test_a_reservation_larger_than_the_budget_goes_through_alone() -> None:
    budget = MemoryBudget(100)
    with budget.reserve(500) as held:  # a lone holder never waits on itself
        assert (held, budget.in_use) == (100, 100)

    release_small, release_big = threading.Event(), threading.Event()
    small, _ = run_in_thread(hold, budget, 30, release_small)
    wait_until(lambda: budget.in_use == 30, 5, "the small reservation")
    big, big_outcome = run_in_thread(hold, budget, 500, release_big)
    wait_until(lambda: budget.waiting == 1, 5, "the large reservation waiting")
    release_later = threading.Event()
    later, later_outcome = run_in_thread(hold, budget, 1, release_later)
    wait_until(lambda: budget.waiting == 2, 5, "a later reservation waiting behind it")

    release_small.set()
    small.join(5)
    wait_until(lambda: budget.in_use == 100, 5, "the large reservation holding everything")
    assert budget.waiting == 1  # the one-byte reservation waits while the large one runs alone
    release_big.set()
    big.join(5)
    assert big_outcome == {"value": 100}
    wait_until(lambda: budget.in_use == 1, 5, "the later reservation after the large one")
    assert budget.high_water == 100
    release_later.set()
    later.join(5)
    assert later_outcome == {"value": 1}


def test_waiters_proceed_in_arrival_order_when_bytes_are_released() -> None:
    budget = MemoryBudget(100)
    release_first = threading.Event()
    first, _ = run_in_thread(hold, budget, 50, release_first)
    wait_until(lambda: budget.in_use == 50, 5, "the first reservation")
    order: list[str] = []

    def reserve(name: str, nbytes: int) -> None:
        with budget.reserve(nbytes):
            order.append(name)

    large, _ = run_in_thread(reserve, "large", 80)
    wait_until(lambda: budget.waiting == 1, 5, "the 80-byte reservation waiting")
    # 10 bytes would fit now, but it came after the 80: it must not starve it.
    small, _ = run_in_thread(reserve, "small", 10)
    wait_until(lambda: budget.waiting == 2, 5, "the 10-byte reservation queued behind it")
    time.sleep(0.2)
    assert order == []

    release_first.set()
    for thread in (first, large, small):
        thread.join(5)
    assert order == ["large", "small"]
    assert (budget.in_use, budget.waiting) == (0, 0)


def test_a_negative_reservation_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"), MemoryBudget(10).reserve(-1):
        pass


# --- settings ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def defaults(default_env: dict[str, str]) -> Settings:
    return load_settings(default_env)


def test_the_default_budget_is_the_documented_one_and_holds_a_max_size_message(
    defaults: Settings, default_env: dict[str, str]
) -> None:
    assert defaults.mail_memory_budget == 96 * MIB
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert f"| `MAILWORKER_MAIL_MEMORY_BUDGET` | integer >= 1048576 | `{96 * MIB}` |" in readme
    assert budget_for(defaults.mail_memory_budget).capacity == 96 * MIB
    assert budget_for(defaults.mail_memory_budget) is budget_for(96 * MIB)  # one per process
    env = dict(default_env)
    small = str(defaults.max_message_size - 1)
    with pytest.raises(ConfigurationError, match=r"MAIL_MEMORY_BUDGET .* at least .*MAX_MESSAGE"):
        load_settings({**env, "MAILWORKER_MAIL_MEMORY_BUDGET": small})


# --- syncs and sends against the real servers ----------------------------------------------------


@pytest.fixture(scope="module")
def small_budget(defaults: Settings, default_env: dict[str, str]) -> Settings:
    """The defaults, with the smallest budget they allow (MAILWORKER_MAX_MESSAGE_SIZE)."""
    env = dict(default_env)
    env["MAILWORKER_MAIL_MEMORY_BUDGET"] = str(defaults.max_message_size)
    settings = load_settings(env)
    assert settings.sync_batch_bytes == 8 * MIB
    return settings


def ids(account: Any) -> tuple[uuid.UUID, uuid.UUID, uuid.UUID]:
    return uuid.UUID(account.tenant_id), uuid.UUID(account.user_id), uuid.UUID(account.account_id)


def large_mail(number: int, size: int) -> bytes:
    head = f"From: sender@example.org\r\nSubject: budget {number}\r\n\r\n".encode()
    line = b"0123456789abcdefghijklmnopqrstuvwxyz" * 2 + b"\r\n"
    return head + line * (size // len(line))


def stored(db_engine: Engine, account: Any) -> int:
    with Session(db_engine) as session:
        query = select(func.count()).where(Message.account_id == uuid.UUID(account.account_id))
        return session.scalar(query) or 0


@pytest.mark.slow
def test_syncs_wait_for_the_budget_before_fetching_and_never_exceed_it(
    small_budget: Settings, make_account: Any, dovecot: Any, db_engine: Engine
) -> None:
    budget = budget_for(small_budget.mail_memory_budget)
    accounts = [make_account(), make_account()]
    for account in accounts:
        for number in range(4):  # 10 MiB: a batch of three (7.5 MiB), then one
            dovecot.deliver(account.address, large_mail(number, 5 * MIB // 2))

    release = threading.Event()
    taken = budget.capacity - 5 * MIB  # leaves less than one batch
    holder, _ = run_in_thread(hold, budget, taken, release)
    wait_until(lambda: budget.in_use == taken, 5, "the test's reservation")
    syncs = [
        run_in_thread(
            sync_account, small_budget, owned_access(small_budget, *ids(account)), ["INBOX"]
        )
        for account in accounts
    ]
    wait_until(lambda: budget.waiting == 2, 30, "both syncs waiting for the budget")
    assert [stored(db_engine, account) for account in accounts] == [0, 0]

    release.set()
    holder.join(5)
    for thread, _ in syncs:
        thread.join(120)
    outcomes = [outcome for _, outcome in syncs]
    assert all("error" not in outcome for outcome in outcomes), outcomes
    assert [outcome["value"]["stored"] for outcome in outcomes] == [4, 4]
    assert [stored(db_engine, account) for account in accounts] == [4, 4]
    assert taken <= budget.high_water <= budget.capacity
    assert (budget.in_use, budget.waiting) == (0, 0)


@pytest.mark.slow
def test_a_send_waits_for_the_budget_and_loads_its_content_once(
    small_budget: Settings, make_account: Any, smtp_server: Any, db_engine: Engine
) -> None:
    budget = budget_for(small_budget.mail_memory_budget)
    alice, bob = make_account(), make_account()
    body = "budget line of a large send\n" * (3 * MIB // 28)
    entry = outbox.store(small_budget, *ids(alice), {"to": [bob.address], "body": body})
    with Session(db_engine) as session:
        size = session.scalar(select(SentMessage.size).where(SentMessage.id == entry.outbox_id))
    assert size is not None
    assert size > 3 * MIB
    taken = budget.capacity - size  # room for the message once, not its 3x
    assert size * SEND_RESERVES_PER_BYTE > budget.capacity - taken

    content_reads: list[str] = []

    def count_content_reads(**event_args: Any) -> None:
        # A statement that returns the content column: a SELECT of it (not one that only
        # measures it), or an UPDATE ... RETURNING it (the claim of a pending entry).
        statement = event_args["statement"]
        selected = statement.lstrip().upper().startswith("SELECT") and re.search(
            r"sent_messages\.content\s*(,|\sFROM)", statement
        )
        if selected or re.search(r"\bRETURNING\b[^;]*\bsent_messages\.content\b", statement):
            content_reads.append(statement)

    release = threading.Event()
    holder, _ = run_in_thread(hold, budget, taken, release)
    wait_until(lambda: budget.in_use == taken, 5, "the test's reservation")
    event.listen(Engine, "before_cursor_execute", count_content_reads, named=True)
    try:
        access = owned_access(small_budget, *ids(alice))
        sender, outcome = run_in_thread(send, small_budget, access, entry.outbox_id, "budget")
        wait_until(lambda: budget.waiting == 1, 30, "the send waiting for the budget")
        assert smtp_server.delivered(entry.message_id) == []
        with Session(db_engine) as session:
            status = session.scalar(
                select(SentMessage.status).where(SentMessage.id == entry.outbox_id)
            )
        assert status == "queued"  # not even claimed: no content loaded while waiting

        release.set()
        holder.join(5)
        sender.join(120)
    finally:
        event.remove(Engine, "before_cursor_execute", count_content_reads)
    assert outcome.get("value", outcome)["status"] == "sent"
    assert len(smtp_server.delivered(entry.message_id)) == 1
    assert len(content_reads) == 1, content_reads  # the claim's; no other statement returns it
    assert budget.high_water <= budget.capacity
    assert (budget.in_use, budget.waiting) == (0, 0)


_FREE_AFTER_A_LARGE_FREE = """
import re, sys
from mailworker.mail.memory_budget import budget_for
def rss():
    return int(re.search(r"VmRSS:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
if sys.argv[1] == "budget":
    budget_for(1 << 20)
first = bytearray(4 << 20)
del first  # glibc's dynamic threshold rises above 4 MiB here
second = bytearray(3 << 20)
pinned = [bytearray(200) for _ in range(2000)]  # allocated after it: above it in the heap
held = rss()
del second
print(held - rss())
"""


def test_freed_message_buffers_leave_the_process():
    """A budget fixes glibc's mmap threshold (the module docstring): a 3 MiB buffer freed after
    a larger one was is unmapped, not left in the heap under later allocations."""

    def returned_kib(mode: str) -> int:
        command = [sys.executable, "-c", _FREE_AFTER_A_LARGE_FREE, mode]
        return int(subprocess.run(command, capture_output=True, text=True, check=True).stdout)

    assert returned_kib("budget") >= 3000
    assert returned_kib("none") < 1000  # glibc's default, which the budget changes
