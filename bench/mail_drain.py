"""One run of the shipped worker units on real mail tasks, timed by the task ledger.

Every task writes its own row in `task_attempts` (started_at when it begins, finished_at when it
ends, by PostgreSQL's clock), so the drain is timed from the first start to the last finish of
this run's tasks without adding anything to the tasks. CPU time of the workers and of each
server is read from /proc before and after (a server's finished children included).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy import Engine, text

from bench.configs import Deployment
from bench.layout import memory_limit
from bench.mailstack import MailStack
from bench.memory import cpu_seconds
from bench.worker_proc import MemorySample, WorkerFailed, running_workers

TERMINAL = ("succeeded", "failed", "rejected")
QUIET_SECONDS = 10.0  # nothing running, nothing finishing: the queue ran dry (expired tasks)


@dataclass
class Drain:
    """What one run of the shipped units did, and what it cost."""

    what: str
    concurrency: int
    queued: int = 0
    finished: int = 0  # tasks that ended (succeeded, failed or rejected)
    failed: int = 0
    items: int = 0  # messages stored, mails sent, or mailboxes synced
    span_seconds: float = math.nan  # first task start to last task end (the ledger's times)
    after_fanout_seconds: float = math.nan  # fan-out start to last task end (idle runs)
    produce_seconds: float = math.nan
    fanout_at: datetime | None = None  # when the tasks began to be queued (PostgreSQL's clock)
    ready_seconds: float = math.nan
    cpu_seconds: dict[str, float] = field(default_factory=dict)  # workers, dovecot, ...
    memory: MemorySample = field(default_factory=MemorySample)

    @property
    def rate(self) -> float:
        """Items per second over the drain."""
        if not self.items or not self.span_seconds > 0:
            return math.nan
        return self.items / self.span_seconds

    def cpu_ms_per_task(self, part: str) -> float:
        spent = self.cpu_seconds.get(part, math.nan)
        return spent * 1000 / self.finished if self.finished else math.nan


@dataclass(frozen=True)
class LedgerCounts:
    finished: int
    failed: int
    running: int
    first_start: datetime | None
    last_finish: datetime | None


def ledger_counts(engine: Engine, task: str, since: datetime) -> LedgerCounts:
    query = text(
        "SELECT count(DISTINCT task_id) FILTER (WHERE state = ANY(:terminal)), "
        "count(DISTINCT task_id) FILTER (WHERE state IN ('failed', 'rejected')), "
        "count(*) FILTER (WHERE state = 'started'), min(started_at), max(finished_at) "
        "FROM task_attempts WHERE task_name = :task AND started_at >= :since"
    )
    with engine.connect() as connection:
        row = connection.execute(
            query, {"terminal": list(TERMINAL), "task": task, "since": since}
        ).one()
    return LedgerCounts(int(row[0]), int(row[1]), int(row[2]), row[3], row[4])


def database_now(engine: Engine) -> datetime:
    with engine.connect() as connection:
        now: datetime = connection.execute(text("SELECT clock_timestamp()")).scalar_one()
        return now


def _produce(deployment: Deployment, argv: list[str], timeout: float) -> tuple[int, float]:
    completed = subprocess.run(
        [sys.executable, "-m", "bench.mail_produce", *argv],
        env=deployment.producer_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if completed.returncode != 0:
        raise WorkerFailed(f"bench.mail_produce {argv[0]} failed: {completed.stderr[-2000:]}")
    report = json.loads(completed.stdout.splitlines()[-1])
    return int(report["queued"]), float(report["seconds"])


def _server_pids(stack: MailStack) -> dict[str, list[int]]:
    assert stack.redis.process is not None
    return {
        "dovecot": [stack.dovecot_pid()],
        "postgres": [stack.postgres_pid()],
        "redis": [stack.redis.process.pid],
    }


def run_drain(
    stack: MailStack,
    engine: Engine,
    deployment: Deployment,
    *,
    what: str,
    task: str,
    produce: list[str],
    count_items: str,
    timeout: float,
    prefill: bool = True,
) -> Drain:
    """Queue the tasks (`produce`: bench.mail_produce's arguments), run the units until every
    queued task ended, or nothing moved for QUIET_SECONDS, or `timeout`; then count.

    `prefill`: queue everything before the workers start (a throughput run); otherwise the
    workers are up first and the tasks arrive as the schedule sends them (the idle run).
    `count_items`: SQL counting what the run produced, with :since the run's start.
    """
    stack.redis.client().flushall()
    stack.forget_deliveries()
    drain = Drain(what, deployment.concurrency)
    since = database_now(engine)
    fanout_started = time.time()
    if prefill:
        drain.fanout_at = database_now(engine)
        drain.queued, drain.produce_seconds = _produce(deployment, produce, timeout)
    with tempfile.TemporaryDirectory(prefix="celery-fleet-bench-mail-") as tmp:
        with running_workers(list(deployment.workers), Path(tmp), memory_limit()) as workers:
            drain.ready_seconds = workers.ready_after
            pids = {"workers": [p.pid for p in workers.processes], **_server_pids(stack)}
            before = {part: cpu_seconds(roots) for part, roots in pids.items()}
            if not prefill:
                drain.fanout_at = database_now(engine)
                fanout_started = time.time()
                drain.queued, drain.produce_seconds = _produce(deployment, produce, timeout)
            deadline = time.monotonic() + timeout
            last_change, last_finished = time.monotonic(), -1
            while True:
                counts = ledger_counts(engine, task, since)
                now = time.monotonic()
                if counts.finished != last_finished:
                    last_change, last_finished = now, counts.finished
                quiet = counts.running == 0 and now - last_change > QUIET_SECONDS
                if counts.finished >= drain.queued or quiet or now > deadline:
                    break
                workers.sample_memory()
                workers.check_alive(Path(tmp))
                time.sleep(0.5)
            after = {part: cpu_seconds(roots) for part, roots in pids.items()}
        drain.memory = workers.memory
    drain.cpu_seconds = {part: after[part] - before[part] for part in pids}
    counts = ledger_counts(engine, task, since)
    drain.finished, drain.failed = counts.finished, counts.failed
    if counts.first_start is not None and counts.last_finish is not None:
        drain.span_seconds = (counts.last_finish - counts.first_start).total_seconds()
        drain.after_fanout_seconds = counts.last_finish.timestamp() - fanout_started
    with engine.connect() as connection:
        drain.items = int(connection.execute(text(count_items), {"since": since}).scalar_one())
    return drain
