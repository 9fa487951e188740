"""One session: prefill a queue, start the workers, time the drain, then latency at a set rate."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.configs import Deployment
from bench.layout import memory_limit
from bench.memory import cpu_seconds
from bench.records import drain_rate, percentile
from bench.redis_server import RedisServer
from bench.worker_proc import MemorySample, RunningWorkers, WorkerFailed, running_workers


@dataclass(frozen=True)
class Workload:
    name: str
    task: str
    io_seconds: float = 0.0


@dataclass
class Session:
    """Everything one session measured for one deployment and one workload."""

    deployment: str
    workload: str
    concurrency: int
    tasks: int
    enqueue_rate: float = math.nan
    drain_rate: float = math.nan
    completed: int = 0
    ready_seconds: float = math.nan
    worker_cpu_ms: float = math.nan  # worker CPU time per drained task, all processes
    redis_cpu_ms: float = math.nan  # redis-server CPU time per drained task
    redis_commands: float = math.nan  # Redis commands per drained task (start-up included)
    command_mix: str = ""  # the commands behind that figure, most frequent first
    latency_rate: float = math.nan
    latency_p50_ms: float = math.nan
    latency_p99_ms: float = math.nan
    common_rate: float = math.nan
    common_p50_ms: float = math.nan
    common_p99_ms: float = math.nan
    memory: MemorySample = field(default_factory=MemorySample)


def _produce(
    deployment: Deployment, workload: Workload, count: int, rate: float
) -> subprocess.Popen[bytes]:
    argv = [
        sys.executable,
        "-m",
        "bench.produce",
        f"--app={deployment.producer_app}",
        f"--task={workload.task}",
        f"--queue={deployment.queue}",
        f"--count={count}",
        f"--rate={rate}",
        f"--io-seconds={workload.io_seconds}",
    ]
    return subprocess.Popen(argv, env=deployment.producer_env, stdout=subprocess.PIPE)


def _producer_result(process: subprocess.Popen[bytes], timeout: float) -> float:
    out, _ = process.communicate(timeout=timeout)
    if process.returncode != 0:
        raise WorkerFailed(f"producer exited with {process.returncode}")
    return float(json.loads(out)["seconds"])


def _wait_for(
    workers: RunningWorkers, log_dir: Path, total: int, deadline: float, sent_after: float = 0.0
) -> int:
    """Poll until `total` tasks sent after `sent_after` finished, or the deadline passed."""
    last_memory = 0.0
    while True:
        workers.reader.poll()
        done = sum(1 for r in workers.reader.records if r.sent >= sent_after)
        now = time.monotonic()
        if done >= total or now > deadline:
            return done
        if now - last_memory > 1.0:
            workers.sample_memory()
            workers.check_alive(log_dir)
            last_memory = now
        time.sleep(0.02)


def _latency_phase(
    deployment: Deployment,
    workload: Workload,
    workers: RunningWorkers,
    log_dir: Path,
    *,
    rate: float,
    seconds: float,
) -> tuple[float, float]:
    """p50 and p99 enqueue->start in ms while a producer sends at `rate` per second."""
    count = max(100, int(rate * seconds))
    # Tasks still reserved from a time-bounded drain finish late: only this phase's tasks count.
    phase_start = time.time()
    process = _produce(deployment, workload, count, rate)
    _producer_result(process, timeout=count / rate * 4 + 60)
    _wait_for(workers, log_dir, count, time.monotonic() + 60, sent_after=phase_start)
    latencies = [r.latency * 1000 for r in workers.reader.records if r.sent >= phase_start]
    return percentile(latencies, 0.50), percentile(latencies, 0.99)


def _commands_per_task(redis: RedisServer, tasks: int) -> tuple[float, str]:
    """Commands Redis served since the last reset, per task: what each setting costs, exactly."""
    if not tasks:
        return math.nan, ""
    stats = redis.client().info("commandstats")
    calls = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
    mix = sorted(calls.items(), key=lambda item: -item[1])
    text = ", ".join(f"{name} {count / tasks:.1f}" for name, count in mix if count / tasks >= 0.05)
    return sum(calls.values()) / tasks, text


def run_session(
    redis: RedisServer,
    deployment: Deployment,
    workload: Workload,
    *,
    tasks: int,
    max_seconds: float,
    latency_seconds: float = 0.0,
    common_rate: float = 0.0,
) -> Session:
    """Drain `tasks` prefilled tasks (or as many as `max_seconds` allow); then latency phases.

    Latency runs at half of the peak this session just measured, and again at `common_rate`
    when it is given, so two deployments can also be compared at the same offered load.
    """
    redis.flush()
    session = Session(deployment.label, workload.name, deployment.concurrency, tasks)
    with tempfile.TemporaryDirectory(prefix="celery-fleet-bench-") as tmp:
        log_dir = Path(tmp)
        process = _produce(deployment, workload, tasks, 0.0)
        session.enqueue_rate = tasks / _producer_result(process, timeout=max(120.0, tasks / 200))
        redis.client().config_resetstat()
        with running_workers(list(deployment.workers), log_dir, memory_limit()) as workers:
            session.ready_seconds = workers.ready_after
            worker_pids = [p.pid for p in workers.processes]
            cpu_before = cpu_seconds(worker_pids), cpu_seconds([redis.pid])
            done = _wait_for(workers, log_dir, tasks, time.monotonic() + max_seconds)
            cpu_after = cpu_seconds(worker_pids), cpu_seconds([redis.pid])
            session.completed = done
            session.redis_commands, session.command_mix = _commands_per_task(redis, done)
            if done:
                session.worker_cpu_ms = (cpu_after[0] - cpu_before[0]) * 1000 / done
                session.redis_cpu_ms = (cpu_after[1] - cpu_before[1]) * 1000 / done
            session.drain_rate = drain_rate(workers.reader.records[:done])
            if done < tasks:
                # A time-bounded point: what is left must not run into the latency phase.
                redis.client().delete(deployment.queue)
            if latency_seconds and not math.isnan(session.drain_rate):
                session.latency_rate = session.drain_rate / 2
                session.latency_p50_ms, session.latency_p99_ms = _latency_phase(
                    deployment,
                    workload,
                    workers,
                    log_dir,
                    rate=session.latency_rate,
                    seconds=latency_seconds,
                )
                if common_rate:
                    session.common_rate = common_rate
                    session.common_p50_ms, session.common_p99_ms = _latency_phase(
                        deployment,
                        workload,
                        workers,
                        log_dir,
                        rate=common_rate,
                        seconds=latency_seconds,
                    )
        session.memory = workers.memory
    return session
