"""The one place where the worker, beat and Flower command lines are built.

systemd, supervisor and Nomad all run `mailworker run SERVICE`, which execs exactly this argv.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Final

from mailworker.errors import ConfigurationError
from mailworker.settings import Settings

SERVICES: Final = ("worker", "beat", "flower", "metrics")
APP: Final = "mailworker.celery_app"
# Flower connects as the monitoring Redis user (MAILWORKER_MONITOR_REDIS_USER).
MONITOR_APP: Final = "mailworker.celery_app:monitor_app"


def celery_command() -> list[str]:
    """The `celery` of this interpreter's environment (the venv on hosts)."""
    script = Path(sys.executable).parent / "celery"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "celery"]


def worker_command() -> list[str]:
    """Celery's `worker` command for this app, without the `celery` umbrella and its plugins
    (see mailworker.worker_command: about 15 MiB less in every worker process)."""
    return [sys.executable, "-m", "mailworker.worker_command"]


def build_argv(service: str, settings: Settings) -> list[str]:
    """The full command line of `service` (worker, beat, flower or metrics)."""
    if service == "worker":
        return _worker(settings)
    if service == "beat":
        return _beat(settings)
    if service == "flower":
        return _flower(settings)
    if service == "metrics":
        return [sys.executable, "-m", "mailworker", "metrics", "serve"]
    raise ValueError(f"unknown service {service!r} (expected one of {', '.join(SERVICES)})")


def shell_quoted(argv: list[str]) -> str:
    return shlex.join(argv)


def _log_options(service: str, settings: Settings) -> list[str]:
    options = [f"--loglevel={settings.log_level}"]
    if settings.log_file:
        options.append(f"--logfile={settings.log_file.replace('{service}', service)}")
    return options


def _worker(s: Settings) -> list[str]:
    argv = [
        *worker_command(),
        f"--queues={','.join(s.queues)}",
        f"--concurrency={s.concurrency}",
        f"--pool={s.pool}",
        f"--hostname={s.node_name}",
        f"--time-limit={s.time_limit}",
        f"--soft-time-limit={s.soft_time_limit}",
        f"--prefetch-multiplier={s.prefetch_multiplier}",
        # Gossip makes every worker consume every other worker's heartbeats (traffic grows with
        # the square of the fleet) for clock sync and elections the app never uses. Mingle stays
        # (a restarted worker learns earlier revokes), heartbeats stay (Flower shows workers).
        "--without-gossip",
        *_log_options("worker", s),
    ]
    if s.task_events:
        argv.append("--task-events")
    if s.max_memory_per_child_kib:
        argv.append(f"--max-memory-per-child={s.max_memory_per_child_kib}")
    return argv


def _beat(s: Settings) -> list[str]:
    return [
        *celery_command(),
        f"--app={APP}",
        "beat",
        "--scheduler=mailworker.beat:LeaseScheduler",
        f"--max-interval={s.beat_max_loop_interval}",
        *_log_options("beat", s),
    ]


def _flower(s: Settings) -> list[str]:
    # Flower logs through Tornado to stderr (the journal): Tornado's own file handler rotates
    # by itself and would fight logrotate.
    argv = [
        *celery_command(),
        f"--app={MONITOR_APP}",
        "flower",
        f"--address={s.flower_address}",
        f"--port={s.flower_port}",
        f"--url_prefix={s.flower_url_prefix}",
        f"--persistent={s.flower_persistent}",
        f"--db={s.flower_db}",
        f"--logging={s.log_level.lower()}",
    ]
    if s.flower_read_only:
        argv.extend(read_only_options(supported=flower_supports("read_only")))
    if not s.task_events:
        # Flower would otherwise switch task events back on in every worker every few seconds.
        argv.append("--enable_events=False")
    return argv


def read_only_options(*, supported: bool) -> list[str]:
    """Flower's read-only switch; an installed Flower without it is refused, never ignored."""
    if not supported:
        raise ConfigurationError(
            "MAILWORKER_FLOWER_READ_ONLY is true but the installed Flower has no --read_only "
            "(it arrived in Flower 2.1): install Flower 2.1 or later, or set "
            "MAILWORKER_FLOWER_READ_ONLY=false to run it with its control operations enabled"
        )
    return ["--read_only=True"]


def check_flower_auth(environ: Mapping[str, str]) -> None:
    """Refuse to start a Flower that every local user of its host could read.

    Flower listens on loopback, where any local user reaches it. Without auth of its own it
    serves its pages (task arguments and results) to all of them, and FLOWER_UNAUTHENTICATED_API
    opens its API as well. Flower reads FLOWER_BASIC_AUTH ("user:password", comma-separated for
    several) or FLOWER_AUTH (OAuth) from its environment: the unit's root-only environment file,
    never the command line, where `ps` would show it.
    """
    if _switched_on(environ.get("FLOWER_UNAUTHENTICATED_API", "")):
        raise ConfigurationError(
            "FLOWER_UNAUTHENTICATED_API is set: it opens Flower's API to every local user of "
            "this host; remove it and give Flower credentials in FLOWER_BASIC_AUTH"
        )
    if environ.get("FLOWER_AUTH", "").strip():
        return
    entries = [entry for entry in environ.get("FLOWER_BASIC_AUTH", "").split(",") if entry]
    if not entries:
        raise ConfigurationError(
            "FLOWER_BASIC_AUTH is not set: Flower would serve its pages and API to every local "
            'user of this host; set it to "user:password" in the unit\'s environment file'
        )
    for position, entry in enumerate(entries, start=1):
        user, _, password = entry.partition(":")
        if not user or not password:
            raise ConfigurationError(
                f'FLOWER_BASIC_AUTH: entry {position} is not "user:password" with both parts set'
            )


def _switched_on(value: str) -> bool:
    """Set to anything but one of Flower's false values (Flower fails on values it cannot read)."""
    return value.strip().lower() not in {"", "0", "false", "no", "off", "n", "f"}


@cache
def flower_supports(option: str) -> bool:
    """Whether the installed Flower defines `option` (--read_only arrived in 2.1)."""
    try:
        import flower.options  # noqa: F401, PLC0415 - registers Flower's Tornado options
        from tornado.options import options  # noqa: PLC0415
    except ImportError:
        return False
    return option in options
