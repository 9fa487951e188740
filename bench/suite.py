"""The measured runs: interleaved rounds of the configurations, then the concurrency sweep."""

from __future__ import annotations

import math
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.configs import Deployment, baseline, same_guarantees, shipped
from bench.layout import WorkerUnit, shipped_units, units_for
from bench.redis_server import RedisServer
from bench.runner import Session, Workload, run_session
from bench.tasks import IO_WAIT_TASK, NOOP_TASK
from bench.worker_proc import WorkerFailed

NOOP = Workload("no-op", NOOP_TASK)
IO = Workload("50 ms I/O", IO_WAIT_TASK, 0.05)
# Both workloads go to `send`, the queue that carries the SMTP round trips: the bench measures
# the units the roles run for it, exactly as deployed.
QUEUE = "send"
GUARANTEES = "same guarantees"
LABELS = ("default", GUARANTEES, "shipped")
ABLATION = "shipped, events off"


@dataclass(frozen=True)
class Plan:
    rounds: int
    noop_tasks: int
    io_tasks: int
    latency_seconds: float
    noop_sweep: tuple[int, ...]
    io_sweep: tuple[int, ...]
    sweep_seconds: float
    sweep_tasks: tuple[int, int]  # prefilled per point (no-op, I/O); the drain stops at the bound


@dataclass
class SweepPoint:
    workload: str
    label: str
    concurrency: int
    rate: float
    note: str = ""


@dataclass
class Results:
    plan: Plan
    units: list[WorkerUnit]
    summaries: dict[str, str] = field(default_factory=dict)
    sessions: list[tuple[int, Session]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    sweep: list[SweepPoint] = field(default_factory=list)

    def of(self, workload: str, label: str) -> list[Session]:
        return [s for _, s in self.sessions if s.workload == workload and s.deployment == label]

    def median(self, workload: str, label: str, value: Callable[[Session], float]) -> float:
        values = [value(s) for s in self.of(workload, label)]
        values = [v for v in values if not math.isnan(v)]
        return statistics.median(values) if values else math.nan


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _deployments(
    redis: RedisServer, units: list[WorkerUnit], concurrency: int | None = None
) -> dict[str, Deployment]:
    return {
        "default": baseline(redis.url, concurrency),
        "shipped": shipped(redis.url, QUEUE, units_for(QUEUE, units), concurrency),
    }


def run_rounds(redis: RedisServer, plan: Plan, results: Results) -> None:
    """The configurations back to back for each workload, `rounds` times, so noise hits all."""
    deployments = _deployments(redis, results.units)
    served_by = units_for(QUEUE, results.units)
    deployments[GUARANTEES] = same_guarantees(redis.url, QUEUE, served_by)
    deployments[ABLATION] = shipped(redis.url, QUEUE, served_by, events=False)
    results.summaries = {label: d.summary for label, d in deployments.items()}
    for round_number in range(1, plan.rounds + 1):
        for workload, tasks in ((NOOP, plan.noop_tasks), (IO, plan.io_tasks)):
            default_peak = 0.0
            labels = (*LABELS, ABLATION) if workload is NOOP else LABELS
            for label in labels:
                deployment = deployments[label]
                _say(f"round {round_number}: {workload.name}, {label} ({tasks} tasks)")
                try:
                    session = run_session(
                        redis,
                        deployment,
                        workload,
                        tasks=tasks,
                        max_seconds=tasks / 10 + 60,
                        latency_seconds=plan.latency_seconds if label != ABLATION else 0.0,
                        common_rate=default_peak / 2 if label == "shipped" else 0.0,
                    )
                except WorkerFailed as failure:
                    results.failures.append(
                        f"round {round_number}, {workload.name}, {label}: {failure}"
                    )
                    continue
                if label == "default" and not math.isnan(session.drain_rate):
                    default_peak = session.drain_rate
                results.sessions.append((round_number, session))
                _say(
                    f"  {session.drain_rate:.0f} tasks/s, p99 {session.latency_p99_ms:.1f} ms "
                    f"at {session.latency_rate:.0f}/s, "
                    f"worker CPU {session.worker_cpu_ms:.2f} ms/task"
                )


def run_sweep(redis: RedisServer, plan: Plan, results: Results) -> None:
    """Throughput against concurrency for both configurations, each point bounded in time."""
    for workload, points, tasks in (
        (NOOP, plan.noop_sweep, plan.sweep_tasks[0]),
        (IO, plan.io_sweep, plan.sweep_tasks[1]),
    ):
        for concurrency in points:
            for label, deployment in _deployments(redis, results.units, concurrency).items():
                _say(f"sweep: {workload.name}, {label}, concurrency {deployment.concurrency}")
                try:
                    session = run_session(
                        redis, deployment, workload, tasks=tasks, max_seconds=plan.sweep_seconds
                    )
                except WorkerFailed as failure:
                    note = "out of memory" if str(failure).startswith("out of memory") else "failed"
                    results.sweep.append(
                        SweepPoint(workload.name, label, deployment.concurrency, math.nan, note)
                    )
                    continue
                note = "" if session.memory.oom_kills == 0 else "OOM kills"
                results.sweep.append(
                    SweepPoint(
                        workload.name, label, deployment.concurrency, session.drain_rate, note
                    )
                )


def load_units() -> list[WorkerUnit]:
    return shipped_units()
