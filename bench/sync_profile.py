"""What one sync_mailbox costs in-process: CPU, SQL statements, round trips, and where the CPU goes.

`python -m bench.sync_profile [--accounts N] [--rounds R] [--new 5] [--profile]` (root: the test
Dovecot runs as dovenull). Not part of `make bench`: a tool for working on the sync path (issue 12).

It starts the test servers (bench/mailstack.py), registers N accounts as an operator does, and
runs the shipped task body, `sync_mailbox.apply(...)` in this process (ledger, tenancy check,
password decryption, advisory lock, IMAP, parsing, INSERTs, classify_spam queued to the real
Redis), with the shipped defaults; no worker process, but marked as a worker's pool marks its
process (`task_join_will_block`): outside a worker, queueing a task also subscribes to its result
in the result backend (a Redis SUBSCRIBE, then an UNSUBSCRIBE when the result object goes),
which a worker never does. Two cases, each R rounds over every account after one untimed first
sync: idle mailboxes, and `--new` new 4 KB messages per mailbox (appended over IMAP before each
round, untimed).

Per sync it reports CPU (this process's time.process_time; on a shared machine the lower
quartile moves least with the neighbours' load), wall time, the statements
SQLAlchemy sent (`before_cursor_execute`), the pool checkouts, and what PostgreSQL itself
received: every statement with log_statement=all (BEGIN, COMMIT and the pool's pre-ping
included), each one round trip with psycopg2's simple query protocol. With --profile it runs the
5-new case once more under cProfile, timed by CPU (process_time, so waiting on a server counts
for nothing), and prints the top functions by cumulative CPU time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import re
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery._state import _set_task_join_will_block
from mailworker.db.engine import get_engine
from mailworker.tasks.base import worker_settings
from mailworker.tasks.sync import sync_mailbox
from sqlalchemy import event

from bench.mail_accounts import fill_mailboxes, register
from bench.mailstack import MailStack, missing_servers, running_mail_stack
from tests.fixtures.servers import Account

_LOGGED = re.compile(r"LOG:  (?:statement|execute [^:]*): (.*)")


@dataclass
class Counts:
    statements: int = 0
    checkouts: int = 0
    connects: int = 0


@dataclass(frozen=True)
class Case:
    name: str
    syncs: int
    cpu_ms: list[float]
    wall_ms: list[float]
    statements: int
    checkouts: int
    connects: int
    server_statements: Counter[str]

    def report(self) -> str:
        per = self.syncs or 1
        trips = sum(self.server_statements.values())
        kinds = ", ".join(
            f"{kind} {count / per:.2f}" for kind, count in self.server_statements.most_common()
        )
        return (
            f"{self.name}: {self.syncs} syncs\n"
            f"  CPU per sync: median {statistics.median(self.cpu_ms):.2f} ms, "
            f"lower quartile {statistics.quantiles(self.cpu_ms, n=4)[0]:.2f} ms, "
            f"mean {statistics.fmean(self.cpu_ms):.2f} ms\n"
            f"  wall per sync: median {statistics.median(self.wall_ms):.2f} ms\n"
            f"  SQLAlchemy statements per sync: {self.statements / per:.2f}; pool checkouts "
            f"{self.checkouts / per:.2f}; new connections {self.connects / per:.2f}\n"
            f"  PostgreSQL round trips per sync (statements it received): {trips / per:.2f}\n"
            f"    by kind: {kinds}"
        )


def _kind(statement: str) -> str:
    words = statement.split()
    head = " ".join(words[:3]).upper() if words else "?"
    for prefix in (
        "SELECT 1",
        "SELECT PG_TRY_ADVISORY_LOCK",
        "SELECT PG_ADVISORY_UNLOCK",
        "INSERT INTO TASK_ATTEMPTS",
        "UPDATE TASK_ATTEMPTS",
        "INSERT INTO MESSAGES",
        "UPDATE FOLDER_SYNC_STATES",
        "INSERT INTO FOLDER_SYNC_STATES",
        "BEGIN",
        "COMMIT",
        "ROLLBACK",
    ):
        if statement.upper().startswith(prefix):
            return prefix.lower()
    if " FROM TENANTS" in statement.upper():
        return "select tenants"
    if " FROM USERS" in statement.upper():
        return "select users"
    if " FROM MAIL_ACCOUNTS" in statement.upper():
        return "select mail_accounts"
    if " FROM FOLDER_SYNC_STATES" in statement.upper():
        return "select folder_sync_states"
    return head.lower()


class ServerLog:
    """The statements PostgreSQL logged since the last call (log_statement=all)."""

    def __init__(self, stack: MailStack) -> None:
        self.path = stack.postgres.directory / "postgres.log"
        stack.postgres.psql("ALTER SYSTEM SET log_statement = 'all'")
        stack.postgres.psql("SELECT pg_reload_conf()")
        time.sleep(0.5)
        self.offset = self.path.stat().st_size

    def take(self) -> Counter[str]:
        with self.path.open("rb") as log:
            log.seek(self.offset)
            text = log.read().decode("utf-8", "replace")
            self.offset = log.tell()
        return Counter(_kind(m.group(1)) for m in _LOGGED.finditer(text))


def _counting(counts: Counts) -> None:
    engine = get_engine(worker_settings())

    @event.listens_for(engine, "before_cursor_execute")
    def _statement(*_: Any) -> None:
        counts.statements += 1

    @event.listens_for(engine.pool, "checkout")
    def _checkout(*_: Any) -> None:
        counts.checkouts += 1

    @event.listens_for(engine.pool, "connect")
    def _connect(*_: Any) -> None:
        counts.connects += 1


def _sync(account: Account) -> dict:
    result = sync_mailbox.apply(args=account.ids)
    if not result.successful():
        raise RuntimeError(f"sync of {account.address} failed: {result.result!r}")
    return result.result


def _case(
    name: str,
    *,
    stack: MailStack,
    accounts: list[Account],
    rounds: int,
    new: int,
    counts: Counts,
    log: ServerLog,
    expect: Callable[[dict], bool],
) -> Case:
    cpu: list[float] = []
    wall: list[float] = []
    server: Counter[str] = Counter()
    before = Counts(counts.statements, counts.checkouts, counts.connects)
    for _ in range(rounds):
        if new:
            fill_mailboxes(stack, accounts, new)
        log.take()  # what filling and the last round left
        for account in accounts:
            cpu0, wall0 = time.process_time(), time.perf_counter()
            result = _sync(account)
            cpu.append((time.process_time() - cpu0) * 1000)
            wall.append((time.perf_counter() - wall0) * 1000)
            if not expect(result):
                raise RuntimeError(f"unexpected result for {account.address}: {result}")
        time.sleep(0.3)  # the logger's write of the last statements
        server += log.take()
    return Case(
        name,
        len(cpu),
        cpu,
        wall,
        counts.statements - before.statements,
        counts.checkouts - before.checkouts,
        counts.connects - before.connects,
        server,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sync_profile", description=__doc__)
    parser.add_argument("--accounts", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new", type=int, default=5, help="new messages per mailbox and round")
    parser.add_argument("--profile", action="store_true", help="also a cProfile of the new case")
    parser.add_argument("--top", type=int, default=40)
    options = parser.parse_args(argv)
    reason = missing_servers()
    if reason:
        parser.error(reason)
    with running_mail_stack() as stack:
        # The shipped defaults: only the connections are set, as a deployment's mailworker.env.
        for name in [name for name in os.environ if name.startswith("MAILWORKER_")]:
            del os.environ[name]
        os.environ.update(stack.settings_env())
        # As every worker pool sets it (celery/concurrency/base.py): no result subscription for
        # the tasks the sync queues.
        _set_task_join_will_block(True)
        accounts = register(stack, options.accounts, "prof")
        counts = Counts()
        _counting(counts)
        for account in accounts:  # the first sync creates the folder's cursor
            _sync(account)
        log = ServerLog(stack)
        common: dict[str, Any] = {
            "stack": stack,
            "accounts": accounts,
            "rounds": options.rounds,
            "counts": counts,
            "log": log,
        }
        idle = _case("idle mailbox", new=0, expect=lambda r: r["stored"] == 0, **common)
        new = _case(
            f"{options.new} new 4 KB messages",
            new=options.new,
            expect=lambda r: r["stored"] == options.new,
            **common,
        )
        print(idle.report())
        print(new.report())
        if options.profile:
            fill_mailboxes(stack, accounts, options.new)
            profiler = cProfile.Profile(time.process_time)  # CPU, not waiting on servers
            profiler.enable()
            for account in accounts:
                _sync(account)
            profiler.disable()
            out = io.StringIO()
            stats = pstats.Stats(profiler, stream=out)
            stats.sort_stats("cumulative").print_stats(options.top)
            print(f"cProfile, {len(accounts)} syncs of {options.new} new messages each:")
            print(out.getvalue())
            stats_file = Path("/tmp/sync_profile.pstats")
            stats.dump_stats(stats_file)
            print(f"(stats written to {stats_file})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
