"""The unit model: the one list of the mailworker units a host runs, built from the inventory.

`celery_units(spec)` turns the celery_units role's variables (roles/celery_units/vars/main.yml
gathers them into `spec`) into one dict per unit. Every process manager renders these dicts as
they are: roles/celery_systemd (unit files), roles/celery_supervisor (programs),
playbooks/nomad.yml (job groups); roles/celery_health, the ops playbooks and bench/layout.py
read them too. Nothing else derives a unit's name, settings file, limits or stop timeout.

Plain Python with no Ansible import, so that the bench and the tests can call it directly.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

SERVICES = ("worker", "beat", "flower", "metrics")
# The inventory group whose hosts run each service. The metrics endpoint reads the whole fleet's
# state from Redis and PostgreSQL, so one beside Flower (the monitoring view) is enough.
SERVICE_GROUPS = {
    "worker": "celery_workers",
    "beat": "celery_beat",
    "flower": "flower",
    "metrics": "flower",
}
# Beat, Flower and the metrics finish their work in seconds; a worker waits for its running tasks.
OTHER_STOP_TIMEOUT_SEC = 30
_SIZE = re.compile(r"^([0-9]+)([KMGT]?)$")
_UNIT_FACTOR = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class UnitModelError(ValueError):
    """An inventory value the model cannot turn into units; the message names the variable."""


def size_bytes(value: object, variable: str) -> int:
    """systemd's MemoryMax= syntax (bytes, or K/M/G/T, base 1024) as bytes."""
    match = _SIZE.match(str(value).strip().upper())
    if not match:
        raise UnitModelError(f"{variable}: {value!r} is not a size such as 512M or 1G")
    return int(match.group(1)) * _UNIT_FACTOR[match.group(2)]


def cpu_percent(value: object, variable: str) -> int:
    """systemd's CPUQuota= ("200%") as a number of percent of one core."""
    text = str(value).strip()
    if not re.fullmatch(r"[1-9][0-9]*%", text):
        raise UnitModelError(f"{variable}: {value!r} is not a percentage such as 100% or 200%")
    return int(text[:-1])


def _text(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _settings(*mappings: Mapping[str, Any] | None) -> dict[str, str]:
    merged: dict[str, str] = {}
    for mapping in mappings:
        for name, value in (mapping or {}).items():
            merged[str(name)] = _text(value)
    return dict(sorted(merged.items()))


def _unit(
    spec: Mapping[str, Any],
    *,
    name: str,
    service: str,
    description: str,
    settings: dict[str, str],
    memory_max: object,
    memory_variable: str,
    cpu_quota: object,
    cpu_variable: str,
    stop_timeout_sec: int,
    state_directories: Sequence[str] = (),
    secret_env_files: Sequence[str] = (),
    worker: Mapping[str, Any] | None = None,
    origins: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    paths = spec["paths"]
    restart = spec["restart"]
    env_file = f"{paths['config_dir']}/{name}.env"
    return {
        "name": name,
        "service": service,
        "description": description,
        "command": [f"{paths['venv']}/bin/mailworker", "run", service],
        "user": paths["user"],
        "group": paths["group"],
        "settings": settings,
        "env_file": env_file,
        "env_files": [f"{paths['config_dir']}/mailworker.env", env_file],
        "secret_env_files": list(secret_env_files),
        "log_file": settings.get("MAILWORKER_LOG_FILE", ""),
        "memory_max": str(memory_max),
        "memory_max_bytes": size_bytes(memory_max, memory_variable),
        "cpu_quota": str(cpu_quota),
        "cpu_percent": cpu_percent(cpu_quota, cpu_variable),
        "stop_timeout_sec": stop_timeout_sec,
        "restart_sec": int(restart["restart_sec"]),
        "start_limit_burst": int(restart["start_limit_burst"]),
        "start_limit_interval_sec": int(restart["start_limit_interval_sec"]),
        "state_directories": list(state_directories),
        "worker": dict(worker) if worker else None,
        # The inventory variable behind each of the unit's own settings, for error messages.
        "origins": dict(origins or {}),
    }


def _origin(shape: Mapping[str, Any], key: str, main: str) -> str:
    """The inventory variable that set `key` of a worker: the instance's own, or the main one's."""
    if shape["variable"] != "celery_units_worker" and key in shape:
        return f"{shape['variable']}.{key}"
    return main


def _worker_units(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    worker = spec["worker"]
    log_dir = spec["paths"]["log_dir"]
    grace = int(spec["stop_grace_sec"])
    shapes = []
    if worker["enabled"]:
        shapes.append(
            {
                "name": "celery-worker",
                "node_name": "celery-worker@%h",
                "log_file": f"{log_dir}/worker.log",
                "queues": worker["queues"],
                "settings": worker.get("settings"),
                "variable": "celery_units_worker",
            }
        )
    for index, instance in enumerate(worker.get("instances") or []):
        label = instance.get("name", "")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", str(label)):
            raise UnitModelError(
                f"celery_units_worker_instances[{index}].name: {label!r} must be letters, "
                "digits, '_' or '-'"
            )
        shapes.append(
            {
                **instance,
                "name": f"celery-worker@{label}",
                "node_name": f"celery-worker-{label}@%h",
                "log_file": f"{log_dir}/worker-{label}.log",
                "variable": f"celery_units_worker_instances[{label}]",
            }
        )
    units = []
    for shape in shapes:
        queues = list(shape.get("queues") or [])
        if not queues:
            raise UnitModelError(f"{shape['variable']}: queues is empty; name at least one queue")
        time_limit = int(shape.get("time_limit", worker["time_limit"]))
        soft_time_limit = int(shape.get("soft_time_limit", worker["soft_time_limit"]))
        pool = str(shape.get("pool", worker["pool"]))
        concurrency = int(shape.get("concurrency", worker["concurrency"]))
        memory_max = shape.get("memory_max", worker["memory_max"])
        cpu_quota = shape.get("cpu_quota", worker["cpu_quota"])
        own = {
            "MAILWORKER_QUEUES": ",".join(queues),
            "MAILWORKER_POOL": pool,
            "MAILWORKER_CONCURRENCY": concurrency,
            "MAILWORKER_NODE_NAME": shape["node_name"],
            "MAILWORKER_TIME_LIMIT": time_limit,
            "MAILWORKER_SOFT_TIME_LIMIT": soft_time_limit,
            "MAILWORKER_LOG_FILE": shape["log_file"],
        }
        variable = shape["variable"]
        instance = variable != "celery_units_worker"
        origins = {
            "MAILWORKER_QUEUES": _origin(shape, "queues", "celery_units_worker_queues"),
            "MAILWORKER_POOL": _origin(shape, "pool", "celery_units_worker_pool"),
            "MAILWORKER_CONCURRENCY": _origin(
                shape, "concurrency", "celery_units_worker_concurrency"
            ),
            "MAILWORKER_TIME_LIMIT": _origin(shape, "time_limit", "celery_units_worker_time_limit"),
            "MAILWORKER_SOFT_TIME_LIMIT": _origin(
                shape, "soft_time_limit", "celery_units_worker_soft_time_limit"
            ),
        }
        extra = f"{variable}.settings" if instance else "celery_units_worker_settings"
        origins |= dict.fromkeys(shape.get("settings") or {}, extra)
        units.append(
            _unit(
                spec,
                name=shape["name"],
                service="worker",
                description=f"mailworker Celery worker ({','.join(queues)}, {pool} x{concurrency})",
                settings=_settings(own, shape.get("settings")),
                memory_max=memory_max,
                memory_variable=f"{shape['variable']}: memory_max",
                cpu_quota=cpu_quota,
                cpu_variable=f"{shape['variable']}: cpu_quota",
                # A warm stop waits for the longest task the unit may run.
                stop_timeout_sec=time_limit + grace,
                worker={
                    "queues": queues,
                    "pool": pool,
                    "concurrency": concurrency,
                    "node_name": shape["node_name"],
                    "time_limit": time_limit,
                    "soft_time_limit": soft_time_limit,
                },
                origins=origins,
            )
        )
    return units


def _beat_unit(spec: Mapping[str, Any]) -> dict[str, Any]:
    beat = spec["beat"]
    # No state on the host: the lease and the last runs live in Redis (mailworker.beat).
    own = {"MAILWORKER_LOG_FILE": f"{spec['paths']['log_dir']}/beat.log"}
    return _unit(
        spec,
        name="celery-beat",
        service="beat",
        description="mailworker Celery beat (the periodic task scheduler)",
        settings=_settings(own, beat.get("settings")),
        memory_max=beat["memory_max"],
        memory_variable="celery_units_beat_memory_max",
        cpu_quota=beat["cpu_quota"],
        cpu_variable="celery_units_beat_cpu_quota",
        stop_timeout_sec=OTHER_STOP_TIMEOUT_SEC,
        origins=dict.fromkeys(beat.get("settings") or {}, "celery_units_beat_settings"),
    )


def _flower_unit(spec: Mapping[str, Any]) -> dict[str, Any]:
    flower = spec["flower"]
    db = str(flower["db"])
    if not re.fullmatch(r"/var/lib/[^/].*/[^/]+", db):
        raise UnitModelError(
            f"celery_units_flower_db: {db!r} must be a file in a directory below /var/lib"
        )
    own = {
        "MAILWORKER_FLOWER_ADDRESS": flower["address"],
        "MAILWORKER_FLOWER_PORT": flower["port"],
        "MAILWORKER_FLOWER_URL_PREFIX": flower["url_prefix"],
        "MAILWORKER_FLOWER_PERSISTENT": flower["persistent"],
        "MAILWORKER_FLOWER_DB": db,
        "MAILWORKER_FLOWER_READ_ONLY": flower["read_only"],
    }
    return _unit(
        spec,
        name="celery-flower",
        service="flower",
        description="mailworker Flower (Celery monitor, loopback only, behind the nginx proxy)",
        settings=_settings(own, flower.get("settings")),
        memory_max=flower["memory_max"],
        memory_variable="celery_units_flower_memory_max",
        cpu_quota=flower["cpu_quota"],
        cpu_variable="celery_units_flower_cpu_quota",
        stop_timeout_sec=OTHER_STOP_TIMEOUT_SEC,
        state_directories=[db.removeprefix("/var/lib/").rsplit("/", 1)[0]],
        secret_env_files=[f"{spec['paths']['config_dir']}/celery-flower-auth.env"],
        origins={
            **{
                key: f"celery_units_flower_{key.removeprefix('MAILWORKER_FLOWER_').lower()}"
                for key in own
            },
            **dict.fromkeys(flower.get("settings") or {}, "celery_units_flower_settings"),
        },
    )


def _metrics_unit(spec: Mapping[str, Any]) -> dict[str, Any]:
    metrics = spec["metrics"]
    own = {
        "MAILWORKER_METRICS_ADDRESS": metrics["address"],
        "MAILWORKER_METRICS_PORT": metrics["port"],
    }
    return _unit(
        spec,
        name="celery-metrics",
        service="metrics",
        description="mailworker metrics for Prometheus (queues, sync lag, outbox, beat's tick)",
        settings=_settings(own, metrics.get("settings")),
        memory_max=metrics["memory_max"],
        memory_variable="celery_units_metrics_memory_max",
        cpu_quota=metrics["cpu_quota"],
        cpu_variable="celery_units_metrics_cpu_quota",
        stop_timeout_sec=OTHER_STOP_TIMEOUT_SEC,
        origins={
            **{
                key: f"celery_units_metrics_{key.removeprefix('MAILWORKER_METRICS_').lower()}"
                for key in own
            },
            **dict.fromkeys(metrics.get("settings") or {}, "celery_units_metrics_settings"),
        },
    )


def _enabled(value: object) -> bool:
    # Ansible hands a templated default over as the string "True" or "False".
    return value is True or str(value).strip().lower() in ("true", "yes", "1")


def celery_units(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The units of one host, in start order: workers, beat, Flower, the metrics endpoint (by
    its inventory groups; the metrics only with celery_units_metrics_enabled)."""
    groups = set(spec.get("groups") or [])
    units: list[dict[str, Any]] = []
    if SERVICE_GROUPS["worker"] in groups:
        units += _worker_units(spec)
    if SERVICE_GROUPS["beat"] in groups:
        units.append(_beat_unit(spec))
    if SERVICE_GROUPS["flower"] in groups:
        units.append(_flower_unit(spec))
    metrics = spec.get("metrics") or {}
    if SERVICE_GROUPS["metrics"] in groups and _enabled(metrics.get("enabled", False)):
        units.append(_metrics_unit(spec))
    names = [unit["name"] for unit in units]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise UnitModelError(
            f"celery_units_worker_instances: {', '.join(duplicates)} listed more than once"
        )
    return units


class FilterModule:
    """Ansible's entry point: `{{ spec | celery_units }}`."""

    def filters(self) -> dict[str, Any]:
        return {"celery_units": _for_ansible}


def _for_ansible(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    try:
        return celery_units(spec)
    except UnitModelError as error:
        from ansible.errors import AnsibleFilterError  # noqa: PLC0415 - only under Ansible

        raise AnsibleFilterError(str(error)) from None
