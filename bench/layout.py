"""The shipped worker layout, read from the unit model: which units serve which queues.

The unit model (roles/celery_units) is the one place that says what a worker host runs. The bench
asks it, through playbooks/units.yml, for a host that is only in the celery_workers group of an
inventory with no variables at all: the units and settings the roles' defaults ship. For a queue
it then starts every unit that consumes it, with that unit's own settings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HOST = "bench-worker-host"


@dataclass(frozen=True)
class WorkerUnit:
    """One worker unit: its queues, pool, concurrency, own MAILWORKER_* settings, memory limit."""

    name: str
    queues: tuple[str, ...]
    pool: str
    concurrency: int
    settings: tuple[tuple[str, str], ...] = ()
    memory_max_bytes: int = 512 * 1024 * 1024

    def setting(self, name: str) -> str | None:
        return dict(self.settings).get(name)


def model_of_defaults() -> list[dict[str, object]]:
    """The unit model of a worker host that sets nothing: what the roles' defaults ship."""
    with tempfile.TemporaryDirectory(prefix="bench-units-") as work:
        inventory = Path(work) / "shipped" / "hosts.yml"
        inventory.parent.mkdir()
        inventory.write_text(f"celery_workers:\n  hosts:\n    {HOST}:\n")
        out = Path(work) / "units"
        env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg")}
        subprocess.run(
            [
                str(Path(sys.executable).parent / "ansible-playbook"),
                "-i",
                str(inventory),
                str(REPO / "playbooks" / "units.yml"),
                "-e",
                json.dumps({"units_dir": str(out)}),
            ],
            check=True,
            capture_output=True,
            text=True,
            cwd=REPO,
            env=env,
        )
        units: list[dict[str, object]] = json.loads((out / f"{HOST}.json").read_text())
        return units


@cache
def shipped_units() -> list[WorkerUnit]:
    """Every worker unit the roles' defaults run on a worker host."""
    units = []
    for unit in model_of_defaults():
        worker = unit["worker"]
        if not isinstance(worker, dict):
            continue
        settings = unit["settings"]
        assert isinstance(settings, dict)
        units.append(
            WorkerUnit(
                name=str(unit["name"]),
                queues=tuple(worker["queues"]),
                pool=str(worker["pool"]),
                concurrency=int(worker["concurrency"]),
                settings=tuple(sorted((str(k), str(v)) for k, v in settings.items())),
                memory_max_bytes=int(str(unit["memory_max_bytes"])),
            )
        )
    return units


def memory_limit() -> int:
    """The workers' memory limit: the largest MemoryMax of the shipped worker units."""
    return max(unit.memory_max_bytes for unit in shipped_units())


def units_for(queue: str, units: list[WorkerUnit]) -> list[WorkerUnit]:
    return [unit for unit in units if queue in unit.queues]
