"""The configurations compared: Celery's defaults, Celery with the shipped guarantees, and what
this project ships.

The baseline is `celery -A bench.defaults_app worker` with no option: prefork, concurrency = cores,
prefetch multiplier 4, early acks, no events, no result backend. The same-guarantees side is
`celery -A bench.guarantees_app worker` (late acks, reject on worker lost, task events, results
in Redis) with the pool, concurrency, prefetch and queues of each shipped unit, one worker per
unit. The shipped side runs exactly the command line `mailworker run worker` execs
(mailworker.launch.build_argv) with the environment a deployed unit gets, plus
`--include=bench.tasks` so the bench's own tasks are registered.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.fernet import Fernet
from mailworker.launch import build_argv, celery_command
from mailworker.settings import Settings, load_settings

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


def _unit_settings(broker_url: str, unit: WorkerUnit, concurrency: int) -> Settings:
    """What the unit's worker runs with: its prefetch, log level and the rest."""
    return load_settings(_unit_env(broker_url, unit, concurrency, {}))


def result_backend_url(broker_url: str) -> str:
    """Database 1 of the broker's Redis, where the shipped worker keeps its results too."""
    base, _, database = broker_url.rpartition("/")
    if not base or not database.isdigit():
        raise ValueError(f"expected a redis://host:port/N broker URL, got {broker_url!r}")
    return f"{base}/1"


def same_guarantees(
    broker_url: str, queue: str, units: list[WorkerUnit], concurrency: int | None = None
) -> Deployment:
    """Celery by hand with the shipped guarantees (bench.guarantees_app), one worker per unit
    that serves `queue`, each with that unit's pool, concurrency, prefetch, queues and log level:
    what differs from `shipped` is the framework, not the pool."""
    if not units:
        raise ValueError(f"no shipped worker unit consumes the queue {queue!r}")
    env = {
        **_base_env(),
        "BENCH_BROKER_URL": broker_url,
        "BENCH_RESULT_BACKEND": result_backend_url(broker_url),
    }
    workers = []
    parts = []
    total = 0
    for unit in units:
        used = concurrency or unit.concurrency
        settings = _unit_settings(broker_url, unit, used)
        argv = [
            *celery_command(),
            "-A",
            "bench.guarantees_app",
            "worker",
            f"--queues={','.join(unit.queues)}",
            f"--pool={unit.pool}",
            f"--concurrency={used}",
            f"--prefetch-multiplier={settings.prefetch_multiplier}",
            f"--hostname=bench-guarantees-{unit.name.replace('@', '-')}@%h",
            # The unit's own log level (INFO: two lines per task), so both sides log alike.
            f"--loglevel={settings.log_level}",
        ]
        workers.append(WorkerSpec(tuple(argv), env))
        total += used
        parts.append(
            f"{unit.name}: {unit.pool} -c {used}, prefetch x{settings.prefetch_multiplier}"
        )
    return Deployment(
        label="same guarantees",
        summary="; ".join(parts) + ", late ack, reject on worker lost, task events, results",
        concurrency=total,
        queue=queue,
        producer_app="bench.guarantees_app:app",
        producer_env=env,
        workers=tuple(workers),
    )


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
