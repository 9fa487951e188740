"""The real work: sync, send and idle mailboxes, each against its protocol's limit, in one run.

1. Sync throughput: mailboxes with a few new messages each, synced by `sync_mailbox` as shipped
   (queued by the real fan-out, sync_all_accounts); new messages per second into PostgreSQL.
   Limit: the plain imaplib loop (bench/plain_loops.py) reading the same mailboxes, plus one
   COPY of the same rows (bench/plain_copy.py). Rate = messages / (IMAP time + COPY time).
2. Send throughput: mails per second through `send_email` as shipped (submitted to the outbox,
   then the ledger, the lock, SMTP and the Sent copy); limit: plain smtplib loops sending the
   same mails to the same server, one session per mail and one reused connection per loop.
3. Idle mailboxes per worker host: every registered mailbox (the ones above, synced, and more
   that stay empty) synced by one fan-out, as beat sends it every MAILWORKER_SYNC_INTERVAL,
   with the workers already running; first a fan-out that makes each mailbox's first sync, then
   the measured one. Whether every mailbox was synced within the interval is counted from
   folder_sync_states.synced_at; the capacity is the interval divided by the measured cost.

Both sides of each ratio run at several concurrencies; the ratio takes the shipped units at
their shipped concurrency against the best plain rate measured.
"""

from __future__ import annotations

import math
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from mailworker.settings import load_settings
from sqlalchemy import Engine, create_engine, text

from bench.configs import Deployment, shipped
from bench.layout import WorkerUnit, units_for
from bench.mail_accounts import Account, fill_mailboxes, register, write_accounts
from bench.mail_drain import Drain, run_drain
from bench.mailstack import MailStack, running_mail_stack
from bench.plain_copy import copy_rows
from bench.plain_loops import PlainRun, run_plain_imap, run_plain_smtp
from bench.worker_proc import WorkerFailed

SYNC_TASK = "mailworker.tasks.sync.sync_mailbox"
SEND_TASK = "mailworker.tasks.send.send_email"
STORED_MESSAGES = "SELECT count(*) FROM messages WHERE synced_at >= :since"
SENT_MAILS = "SELECT count(*) FROM sent_messages WHERE status = 'sent' AND sent_at >= :since"
SYNCED_MAILBOXES = "SELECT count(*) FROM folder_sync_states WHERE synced_at >= :since"


@dataclass(frozen=True)
class MailPlan:
    rounds: int  # the shipped concurrency and every plain point, interleaved, this many times
    sync_mailboxes: int
    messages_per_mailbox: int
    sends: int
    send_accounts: int
    idle_mailboxes: int  # every registered mailbox, the sync ones included
    threads_sweep: tuple[int, ...]  # threads per shipped unit, besides the shipped number
    plain_sweep: tuple[int, ...]  # plain loops in parallel


@dataclass(frozen=True)
class PlainSync:
    """One plain imaplib read of every mailbox, and the COPY of what it fetched."""

    loops: int
    messages: int
    imap_seconds: float
    copy_seconds: float

    @property
    def rate(self) -> float:
        seconds = self.imap_seconds + self.copy_seconds
        return self.messages / seconds if seconds > 0 else math.nan


@dataclass(frozen=True)
class PlainSend:
    mode: str  # "session per mail" | "reused connection"
    run: PlainRun


Plain = TypeVar("Plain", "PlainSync", "PlainSend")


@dataclass
class MailResults:
    plan: MailPlan
    shipped_concurrency: int = 0
    summary: str = ""
    sync: list[tuple[int, Drain]] = field(default_factory=list)  # (round, drain)
    sync_plain: list[tuple[int, PlainSync]] = field(default_factory=list)
    send: list[tuple[int, Drain]] = field(default_factory=list)
    send_plain: list[tuple[int, PlainSend]] = field(default_factory=list)
    idle_first: Drain | None = None
    idle: Drain | None = None
    idle_within: int = 0  # of the measured idle fan-out: synced within the interval
    sync_interval: int = 300
    failures: list[str] = field(default_factory=list)
    skipped: str = ""

    def shipped_rate(self, what: str) -> float:
        """Median rate of the shipped units at their shipped concurrency."""
        drains = self.sync if what == "sync" else self.send
        rates = [
            d.rate
            for _, d in drains
            if d.concurrency == self.shipped_concurrency and not math.isnan(d.rate)
        ]
        return statistics.median(rates) if rates else math.nan

    def plain_sync_best(self) -> PlainSync | None:
        """The plain loop count with the best median rate (the limit), as one of its runs."""
        return _best([p for _, p in self.sync_plain], lambda p: p.loops)

    def plain_send_best(self, mode: str | None = None) -> PlainSend | None:
        runs = [p for _, p in self.send_plain if mode is None or p.mode == mode]
        return _best(runs, lambda p: (p.mode, p.run.loops))


def _rate(item: PlainSync | PlainSend) -> float:
    return item.rate if isinstance(item, PlainSync) else item.run.rate


def _best(items: Sequence[Plain], key: Callable[[Plain], object]) -> Plain | None:
    """From the group (same `key`) with the best median rate, its upper-median run: the median
    run of an odd group, the faster of the two middle ones of an even group, so a limit is
    never a round's slower run (two rounds: the faster)."""
    groups: dict[object, list[Plain]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    best: Plain | None = None
    best_rate = -1.0
    for group in groups.values():
        runs = sorted((item for item in group if not math.isnan(_rate(item))), key=_rate)
        if not runs:
            continue
        median = statistics.median(_rate(item) for item in runs)
        if median > best_rate:
            best_rate = median
            best = runs[len(runs) // 2]
    return best


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _deployment(stack: MailStack, units: list[WorkerUnit], threads: int | None) -> Deployment:
    return shipped(
        stack.redis.url,
        "sync",
        units_for("sync", units),
        threads,
        connections=stack.settings_env(),
    )


def _forget_synced(engine: Engine) -> None:
    """The mailboxes' messages become new again: what the previous sync run stored goes."""
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM messages"))
        connection.execute(text("DELETE FROM folder_sync_states"))


@dataclass(frozen=True)
class _Run:
    """What every phase of one run shares."""

    stack: MailStack
    engine: Engine
    units: list[WorkerUnit]
    results: MailResults
    work_dir: Path

    def deployment(self, threads: int | None) -> Deployment:
        return _deployment(self.stack, self.units, threads)

    def shipped_drain(
        self, what: str, threads: int | None, round_number: int, **drain: object
    ) -> Drain | None:
        deployment = self.deployment(threads)
        _say(f"mail round {round_number}: {what}, shipped, concurrency {deployment.concurrency}")
        try:
            result = run_drain(self.stack, self.engine, deployment, what=what, **drain)  # type: ignore[arg-type]
        except WorkerFailed as failure:
            self.results.failures.append(f"{what}, concurrency {deployment.concurrency}: {failure}")
            return None
        _say(f"  {result.items} done, {result.rate:.1f}/s, {result.failed} failed")
        return result


def _sync_round(
    run: _Run, accounts: list[Account], threads: tuple[int | None, ...], round_number: int
) -> None:
    stack, results = run.stack, run.results
    for count in threads:
        _forget_synced(run.engine)
        drain = run.shipped_drain(
            "sync", count, round_number, task=SYNC_TASK, produce=["fanout"],
            count_items=STORED_MESSAGES, timeout=600,
        )  # fmt: skip
        if drain is not None:
            results.sync.append((round_number, drain))
    server = (stack.dovecot.host, stack.dovecot.port, str(stack.certificates.ca_file))
    for loops in results.plan.plain_sweep:
        _say(f"mail round {round_number}: sync, plain imaplib, {loops} loop(s)")
        plain_run, rows = run_plain_imap(server, accounts, loops, run.work_dir)
        copy_seconds = copy_rows(stack.database_url, rows, accounts)
        plain = PlainSync(loops, len(rows), plain_run.seconds, copy_seconds)
        results.sync_plain.append((round_number, plain))
        _say(f"  {plain.messages} messages, {plain.rate:.1f}/s (COPY {copy_seconds:.3f} s)")


def _send_round(
    run: _Run, accounts_file: Path, threads: tuple[int | None, ...], round_number: int
) -> None:
    stack, results = run.stack, run.results
    sends = results.plan.sends
    produce = ["send", f"--accounts={accounts_file}", f"--count={sends}"]
    for count in threads:
        drain = run.shipped_drain(
            "send", count, round_number, task=SEND_TASK, produce=produce,
            count_items=SENT_MAILS, timeout=600,
        )  # fmt: skip
        if drain is not None:
            results.send.append((round_number, drain))
    server = (stack.smtp.host, stack.smtp.port, str(stack.certificates.ca_file))
    login = (stack.smtp.username, stack.smtp.password)
    for reuse in (False, True):
        mode = "reused connection" if reuse else "session per mail"
        for loops in results.plan.plain_sweep:
            _say(f"mail round {round_number}: send, plain smtplib, {mode}, {loops} loop(s)")
            stack.forget_deliveries()
            plain = run_plain_smtp(server, login, accounts_file, sends, loops, reuse=reuse)
            results.send_plain.append((round_number, PlainSend(mode, plain)))
            _say(f"  {plain.items} mails, {plain.rate:.1f}/s")


def _idle(
    stack: MailStack, engine: Engine, units: list[WorkerUnit], plan: MailPlan, registered: int
) -> tuple[Drain, Drain]:
    more = max(0, plan.idle_mailboxes - registered)
    _say(f"idle: registering {more} more mailboxes ({plan.idle_mailboxes} in all)")
    register(stack, more, "idle")
    deployment = _deployment(stack, units, None)
    drains = []
    for what in ("idle, first sync", "idle"):
        _say(f"{what}: one fan-out of {plan.idle_mailboxes} syncs, workers running")
        drain = run_drain(
            stack, engine, deployment, what=what, task=SYNC_TASK, produce=["fanout"],
            count_items=SYNCED_MAILBOXES, timeout=results_interval(deployment) + 60,
            prefill=False,
        )  # fmt: skip
        _say(
            f"  {drain.items} mailboxes synced, last {drain.after_fanout_seconds:.0f} s after "
            f"the fan-out began"
        )
        drains.append(drain)
    return drains[0], drains[1]


def synced_within(engine: Engine, drain: Drain, interval: int) -> int:
    """Mailboxes whose sync ended no later than `interval` seconds after the fan-out began."""
    query = text(
        "SELECT count(*) FROM folder_sync_states WHERE synced_at >= :start "
        "AND synced_at <= :start + make_interval(secs => :interval)"
    )
    with engine.connect() as connection:
        return int(
            connection.execute(query, {"start": drain.fanout_at, "interval": interval}).scalar_one()
        )


def _idle_phase(run: _Run, registered: int) -> None:
    results = run.results
    results.idle_first, results.idle = _idle(
        run.stack, run.engine, run.units, results.plan, registered
    )
    results.idle_within = synced_within(run.engine, results.idle, results.sync_interval)


def _guarded(results: MailResults, what: str, phase: Callable[..., None], *args: object) -> None:
    """Run one phase; a failure is reported with the results, and the other phases still run."""
    try:
        phase(*args)
    except Exception as failure:  # a bench phase must not lose the whole run's figures
        first = str(failure).strip().splitlines()
        results.failures.append(f"{what}: {type(failure).__name__}: {first[0] if first else ''}")
        _say(f"{what} failed: {failure!r}")


def results_interval(deployment: Deployment) -> int:
    """The sync interval the shipped units run with (MAILWORKER_SYNC_INTERVAL)."""
    return load_settings(deployment.workers[0].env).sync_interval


def run_mail_phases(plan: MailPlan, units: list[WorkerUnit]) -> MailResults:
    """Every mail phase on freshly started servers; the servers stop before this returns."""
    results = MailResults(plan)
    with running_mail_stack() as stack, tempfile.TemporaryDirectory() as tmp:
        work_dir = Path(tmp)
        engine = create_engine(stack.database_url, pool_size=2)
        shipped_deployment = _deployment(stack, units, None)
        results.shipped_concurrency = shipped_deployment.concurrency
        results.summary = shipped_deployment.summary
        results.sync_interval = results_interval(shipped_deployment)
        _say(f"mail: registering {plan.sync_mailboxes} mailboxes, {plan.messages_per_mailbox} new")
        accounts = register(stack, plan.sync_mailboxes, "sync")
        fill_mailboxes(stack, accounts, plan.messages_per_mailbox)
        accounts_file = work_dir / "send-accounts.json"
        write_accounts(accounts[: plan.send_accounts], accounts_file)
        run = _Run(stack, engine, units, results, work_dir)
        sweep: tuple[int | None, ...] = tuple(plan.threads_sweep)
        for round_number in range(1, plan.rounds + 1):
            threads = (None, *sweep) if round_number == 1 else (None,)
            _guarded(
                results,
                f"sync, round {round_number}",
                _sync_round,
                run,
                accounts,
                threads,
                round_number,
            )
        for round_number in range(1, plan.rounds + 1):
            threads = (None, *sweep) if round_number == 1 else (None,)
            _guarded(
                results,
                f"send, round {round_number}",
                _send_round,
                run,
                accounts_file,
                threads,
                round_number,
            )
        _guarded(results, "idle", _idle_phase, run, len(accounts))
        engine.dispose()
    return results
