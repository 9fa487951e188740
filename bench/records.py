"""Reading the per-task records the bench tasks write, and the statistics made from them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class TaskRecord:
    sent: float
    started: float
    finished: float

    @property
    def latency(self) -> float:
        """Enqueue to start, in seconds."""
        return self.started - self.sent


@dataclass
class RecordReader:
    """Reads the record files incrementally, so polling stays cheap while a run is going."""

    directory: Path
    records: list[TaskRecord] = field(default_factory=list)
    _offsets: dict[Path, int] = field(default_factory=dict)

    def poll(self) -> int:
        for path in sorted(self.directory.glob("tasks-*.log")):
            offset = self._offsets.get(path, 0)
            with path.open("rb") as handle:
                handle.seek(offset)
                chunk = handle.read()
            complete = chunk[: chunk.rfind(b"\n") + 1]
            self._offsets[path] = offset + len(complete)
            for line in complete.decode().splitlines():
                sent, started, finished = (float(part) for part in line.split())
                self.records.append(TaskRecord(sent, started, finished))
        return len(self.records)

    def ready_pids(self) -> list[int]:
        return [int(path.name.removeprefix("ready-")) for path in self.directory.glob("ready-*")]


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def drain_rate(records: list[TaskRecord]) -> float:
    """Tasks per second from the first start to the last finish."""
    if len(records) < 2:
        return math.nan
    span = max(r.finished for r in records) - min(r.started for r in records)
    return len(records) / span if span > 0 else math.nan
