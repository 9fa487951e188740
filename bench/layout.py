"""The shipped worker layout, read from the roles' defaults: which units serve which queues.

The bench starts, for a queue, every unit the celery_worker role would run for it on one host
(the main celery-worker.service and any celery-worker@ instance), with the environment the role
writes for it: mailworker_app's host-wide settings, then the unit's own, as systemd reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROLES = Path(__file__).resolve().parent.parent / "roles"


@dataclass(frozen=True)
class WorkerUnit:
    """One systemd worker unit: its queues, pool, concurrency and extra MAILWORKER_* settings."""

    name: str
    queues: tuple[str, ...]
    pool: str
    concurrency: int
    settings: tuple[tuple[str, str], ...] = ()

    def setting(self, name: str) -> str | None:
        return dict(self.settings).get(name)


def _defaults(role: str) -> dict[str, Any]:
    path = ROLES / role / "defaults" / "main.yml"
    data = yaml.safe_load(path.read_text()) if path.exists() else None
    return data if isinstance(data, dict) else {}


def _settings(*mappings: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    merged: dict[str, str] = {}
    for mapping in mappings:
        for name, value in (mapping or {}).items():
            merged[str(name)] = str(value).lower() if isinstance(value, bool) else str(value)
    return tuple(sorted(merged.items()))


def shipped_units() -> list[WorkerUnit]:
    """Every worker unit the roles' defaults run on a worker host."""
    app = _defaults("mailworker_app")
    worker = _defaults("celery_worker")
    host_wide = {"MAILWORKER_LOG_LEVEL": app.get("mailworker_app_log_level", "INFO")}
    host_wide |= app.get("mailworker_app_settings") or {}
    pool = str(worker.get("celery_worker_pool", "prefork"))
    concurrency = int(worker.get("celery_worker_concurrency", 4))
    units = []
    if worker.get("celery_worker_enabled", True):
        units.append(
            WorkerUnit(
                "main",
                tuple(
                    worker.get(
                        "celery_worker_queues", ("sync", "send", "delete", "spam", "periodic")
                    )
                ),
                pool,
                concurrency,
                _settings(host_wide, worker.get("celery_worker_settings") or {}),
            )
        )
    for instance in worker.get("celery_worker_instances") or []:
        units.append(
            WorkerUnit(
                str(instance["name"]),
                tuple(instance["queues"]),
                str(instance.get("pool", pool)),
                int(instance.get("concurrency", concurrency)),
                _settings(host_wide, instance.get("settings") or {}),
            )
        )
    return units


def units_for(queue: str, units: list[WorkerUnit]) -> list[WorkerUnit]:
    return [unit for unit in units if queue in unit.queues]
