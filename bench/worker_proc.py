"""Worker processes: start them in a memory cgroup, wait until they consume, sample, stop."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench.memory import MemoryCgroup, descendants, peak_rss_bytes, process_name, pss_bytes
from bench.records import RecordReader
from bench.tasks import RECORD_DIR_ENV


class WorkerFailed(RuntimeError):
    """A worker did not start or died; the message carries the end of its log."""


@dataclass(frozen=True)
class WorkerSpec:
    """One worker process: its command line and the environment it runs with."""

    argv: tuple[str, ...]
    env: dict[str, str]


@dataclass
class MemorySample:
    """Peak RSS and sampled peak PSS per process (bytes), the largest PSS sum of one sample, and
    the cgroup's peak for the whole group of workers."""

    per_process: dict[int, tuple[str, int]] = field(default_factory=dict)
    pss_per_process: dict[int, tuple[str, int]] = field(default_factory=dict)
    pss_sum_peak: int = 0
    cgroup_peak: int | None = None
    oom_kills: int = 0

    def record(self, root_pids: list[int]) -> None:
        pss_sum = 0
        for root in root_pids:
            for pid in descendants(root):
                rss = peak_rss_bytes(pid)
                if rss is None:
                    continue
                name = process_name(pid)
                _, known = self.per_process.get(pid, ("", 0))
                self.per_process[pid] = (name, max(known, rss))
                pss = pss_bytes(pid)
                if pss is not None:
                    pss_sum += pss
                    _, known = self.pss_per_process.get(pid, ("", 0))
                    self.pss_per_process[pid] = (name, max(known, pss))
        self.pss_sum_peak = max(self.pss_sum_peak, pss_sum)

    @property
    def max_process_rss(self) -> int:
        return max((rss for _, rss in self.per_process.values()), default=0)

    @property
    def max_process_pss(self) -> int:
        return max((pss for _, pss in self.pss_per_process.values()), default=0)


@dataclass
class RunningWorkers:
    processes: list[subprocess.Popen[bytes]]
    reader: RecordReader
    memory: MemorySample
    cgroup: MemoryCgroup | None
    started_at: float
    ready_after: float = 0.0

    def sample_memory(self) -> None:
        self.memory.record([p.pid for p in self.processes])

    def check_alive(self, log_dir: Path) -> None:
        for process in self.processes:
            if process.poll() is not None:
                raise WorkerFailed(_failure(process.returncode, self.cgroup, log_dir))


def _failure(returncode: int | None, cgroup: MemoryCgroup | None, log_dir: Path) -> str:
    kills = cgroup.oom_kills() if cgroup is not None else 0
    oom = f"out of memory ({kills} OOM kills in the cgroup); " if kills else ""
    return f"{oom}worker exited with {returncode}: {_log_tail(log_dir)}"


def _log_tail(log_dir: Path, lines: int = 15) -> str:
    tails = []
    for path in sorted(log_dir.glob("worker-*.log")):
        tails.extend(path.read_text(errors="replace").splitlines()[-lines:])
    return "\n".join(tails)


def _cgroup_wrapped(argv: tuple[str, ...], cgroup: MemoryCgroup | None) -> list[str]:
    if cgroup is None:
        return list(argv)
    # The shell joins the cgroup before exec, so every pool process forked later is inside it too.
    join = 'echo $$ > "$0/cgroup.procs" && exec "$@"'
    return ["/bin/sh", "-c", join, str(cgroup.path), *argv]


@contextmanager
def running_workers(
    specs: list[WorkerSpec],
    record_dir: Path,
    memory_limit: int,
    ready_timeout: float = 60.0,
) -> Iterator[RunningWorkers]:
    """Start every spec in one memory cgroup; yield once all of them consume; stop them after."""
    cgroup = MemoryCgroup.create(f"celery-fleet-bench-{os.getpid()}", memory_limit)
    processes: list[subprocess.Popen[bytes]] = []
    started_at = time.monotonic()
    try:
        for index, spec in enumerate(specs):
            log = (record_dir / f"worker-{index}.log").open("wb")
            env = {**spec.env, RECORD_DIR_ENV: str(record_dir)}
            processes.append(
                subprocess.Popen(
                    _cgroup_wrapped(spec.argv, cgroup),
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
            log.close()
        workers = RunningWorkers(
            processes, RecordReader(record_dir), MemorySample(), cgroup, started_at
        )
        deadline = started_at + ready_timeout
        while len(workers.reader.ready_pids()) < len(specs):
            workers.check_alive(record_dir)
            if time.monotonic() > deadline:
                kills = cgroup.oom_kills() if cgroup is not None else 0
                oom = f"out of memory ({kills} OOM kills in the cgroup); " if kills else ""
                raise WorkerFailed(
                    oom + f"workers not ready in {ready_timeout:.0f} s: {_log_tail(record_dir)}"
                )
            time.sleep(0.05)
        workers.ready_after = time.monotonic() - started_at
        yield workers
        workers.sample_memory()
        if cgroup is not None:
            workers.memory.cgroup_peak = cgroup.peak_bytes()
            workers.memory.oom_kills = cgroup.oom_kills()
    finally:
        _stop(processes)
        if cgroup is not None:
            cgroup.remove()


def _stop(processes: list[subprocess.Popen[bytes]], timeout: float = 20.0) -> None:
    """Warm shutdown (TERM to the main process, like KillMode=mixed), then KILL the group."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
