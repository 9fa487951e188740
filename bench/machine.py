"""What the figures were measured on: machine, load, software versions."""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path


@dataclass(frozen=True)
class Machine:
    cpu: str
    cores: int
    memory_gib: float
    kernel: str
    python: str
    versions: str
    redis: str

    def describe(self) -> str:
        return (
            f"{self.cpu}, {self.cores} cores, {self.memory_gib:.0f} GiB; Linux {self.kernel}; "
            f"Python {self.python}; {self.versions}; {self.redis}"
        )


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _memory_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024 / 1024
    return 0.0


def _redis_version() -> str:
    try:
        out = subprocess.run(
            ["redis-server", "--version"], capture_output=True, text=True, check=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "redis-server unknown"
    return out.split(" sha=")[0].replace("Redis server v=", "redis-server ")


def describe_machine() -> Machine:
    packages = ("celery", "kombu", "redis", "billiard")
    return Machine(
        cpu=_cpu_model(),
        cores=os.cpu_count() or 1,
        memory_gib=_memory_gib(),
        kernel=platform.release(),
        python=platform.python_version(),
        versions=", ".join(f"{name} {version(name)}" for name in packages),
        redis=_redis_version(),
    )


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()
