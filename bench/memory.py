"""What the workers use: a memory cgroup capping them like MemoryMax, peak RSS and PSS, CPU."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class MemoryCgroup:
    path: Path
    version: int

    @classmethod
    def create(cls, name: str, limit_bytes: int) -> MemoryCgroup | None:
        """A fresh cgroup with the limit, or None where this machine does not let us make one."""
        candidates = [(1, CGROUP_ROOT / "memory", "memory.limit_in_bytes")]
        if "memory" in _read(CGROUP_ROOT / "cgroup.controllers"):
            candidates.append((2, CGROUP_ROOT, "memory.max"))
        for version, root, limit_file in candidates:
            if not (root / "cgroup.procs").exists():
                continue
            path = root / name
            try:
                path.mkdir(exist_ok=True)
                (path / limit_file).write_text(str(limit_bytes))
            except OSError:
                with contextlib.suppress(OSError):
                    path.rmdir()
                continue
            return cls(path, version)
        return None

    def peak_bytes(self) -> int | None:
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        try:
            return int((self.path / name).read_text())
        except (OSError, ValueError):
            return None

    def oom_kills(self) -> int:
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        try:
            for line in (self.path / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except OSError:
            pass
        return 0

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)


def descendants(pid: int) -> list[int]:
    """pid and every process below it, from /proc/PID/task/TID/children."""
    found = [pid]
    index = 0
    while index < len(found):
        current = found[index]
        index += 1
        for children in Path(f"/proc/{current}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                found.extend(int(child) for child in children.read_text().split())
    return found


def peak_rss_bytes(pid: int) -> int | None:
    """VmHWM: the most resident memory the process has had, in bytes."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def pss_bytes(pid: int) -> int | None:
    """Proportional set size now, in bytes: each page shared by N processes counts 1/N to each,
    so the sum over a group of processes is what the group holds (RSS counts shared pages, the
    prefork children's copy-on-write pages included, once per process)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def cpu_seconds(root_pids: list[int]) -> float:
    """CPU time (user + system) of these processes, everything below them, and reaped children."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for root in root_pids:
        for pid in descendants(root):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            # Fields after the command name, which may contain spaces, start at index 2.
            fields = stat[stat.rfind(")") + 2 :].split()
            total += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
    return total / ticks


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
