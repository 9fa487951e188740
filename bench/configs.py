"""The two configurations compared: Celery's defaults, and what this project ships.

The baseline is `celery -A bench.defaults_app worker` with no option: prefork, concurrency = cores,
prefetch multiplier 4, early acks, no events, no result backend. The shipped side runs exactly the
command line `mailworker run worker` execs (mailworker.launch.build_argv) with the environment a
deployed unit gets, plus `--include=bench.tasks` so the bench's own tasks are registered.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.fernet import Fernet
from mailworker.launch import build_argv, celery_command
from mailworker.settings import load_settings

from bench.layout import WorkerUnit
from bench.worker_proc import WorkerSpec

REPO = Path(__file__).resolve().parent.parent
# Never connected to: the bench tasks touch no database, but the settings require a URL.
UNUSED_DATABASE_URL = "postgresql+psycopg2://bench:unused@127.0.0.1:9/bench"
_PASSED_THROUGH = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")


@dataclass(frozen=True)
class Deployment:
    """Workers to start, the queue they consume, and the app the producer publishes with."""

    label: str
    summary: str
    concurrency: int
    queue: str
    producer_app: str
    producer_env: dict[str, str]
    workers: tuple[WorkerSpec, ...]


def _base_env() -> dict[str, str]:
    env = {name: os.environ[name] for name in _PASSED_THROUGH if name in os.environ}
    env["PYTHONPATH"] = str(REPO)
    return env


def baseline(broker_url: str, concurrency: int | None = None) -> Deployment:
    """Celery's defaults; `concurrency` only for the throughput-against-concurrency sweep."""
    env = {**_base_env(), "BENCH_BROKER_URL": broker_url}
    argv = [*celery_command(), "-A", "bench.defaults_app", "worker"]
    cores = os.cpu_count() or 1
    if concurrency is not None:
        argv.append(f"--concurrency={concurrency}")
    used = concurrency or cores
    return Deployment(
        label="default",
        summary=f"prefork -c {used}, prefetch x4, early ack, no events, no results",
        concurrency=used,
        queue="celery",
        producer_app="bench.defaults_app:app",
        producer_env=env,
        workers=(WorkerSpec(tuple(argv), env),),
    )


def _unit_env(
    broker_url: str, unit: WorkerUnit, concurrency: int, connections: Mapping[str, str]
) -> dict[str, str]:
    return {
        **_base_env(),
        "MAILWORKER_BROKER_URL": broker_url,
        "MAILWORKER_DATABASE_URL": UNUSED_DATABASE_URL,
        "MAILWORKER_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
        **connections,
        **dict(unit.settings),
        "MAILWORKER_QUEUES": ",".join(unit.queues),
        "MAILWORKER_POOL": unit.pool,
        "MAILWORKER_CONCURRENCY": str(concurrency),
        "MAILWORKER_NODE_NAME": f"bench-{unit.name.replace('@', '-')}@%h",
        "MAILWORKER_LOG_FILE": "",
    }


def shipped(
    broker_url: str,
    queue: str,
    units: list[WorkerUnit],
    concurrency: int | None = None,
    *,
    events: bool = True,
    connections: Mapping[str, str] | None = None,
) -> Deployment:
    """The units that serve `queue`; `concurrency` overrides each unit's only for the sweep.

    `events=False` is the one ablation: MAILWORKER_TASK_EVENTS=false, what a fleet without
    Flower's task views would run (Flower itself turns events back on unless told not to).
    `connections`: the MAILWORKER_* a deployment's mailworker.env sets (database, keys, CA) for
    workers that run the real mail tasks; the synthetic tasks touch no database.
    """
    if not units:
        raise ValueError(f"no shipped worker unit consumes the queue {queue!r}")
    workers = []
    parts = []
    total = 0
    for unit in units:
        used = concurrency or unit.concurrency
        env = _unit_env(broker_url, unit, used, connections or {})
        if not events:
            env["MAILWORKER_TASK_EVENTS"] = "false"
        settings = load_settings(env)
        argv = [*build_argv("worker", settings), "--include=bench.tasks"]
        workers.append(WorkerSpec(tuple(argv), env))
        total += used
        parts.append(
            f"{unit.name}: {unit.pool} -c {used}, prefetch x{settings.prefetch_multiplier}"
        )
    return Deployment(
        label="shipped" if events else "shipped, events off",
        summary="; ".join(parts) + ", late ack" + ("" if events else ", task events off"),
        concurrency=total,
        queue=queue,
        producer_app="mailworker.celery_app:app",
        producer_env=workers[0].env,
        workers=tuple(workers),
    )
