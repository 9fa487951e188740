"""Every Celery setting the app uses, derived from `Settings`, each with the reason it is set.

`explain_config()` keeps the reason next to each value as data (the bench prints it beside
Celery's default); `build_config()` is the plain dict Celery reads.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, NamedTuple

from celery.schedules import schedule
from kombu import Exchange, Queue

from mailworker import keepalive, publish_time, redis_transport
from mailworker.redis_client import SENTINEL_TIMEOUT, celery_url, sentinel_options, tls_options
from mailworker.settings import QUEUES, Settings

# Task name prefix -> queue. Each task module holds the tasks of one queue.
TASK_QUEUES: dict[str, str] = {
    "mailworker.tasks.sync.*": "sync",
    "mailworker.tasks.send.*": "send",
    "mailworker.tasks.delete.*": "delete",
    "mailworker.tasks.spam.*": "spam",
    "mailworker.tasks.periodic.*": "periodic",
}
TASK_MODULES: tuple[str, ...] = tuple(pattern.removesuffix(".*") for pattern in TASK_QUEUES)
SYNC_ALL_ACCOUNTS = "mailworker.tasks.periodic.sync_all_accounts"
CLEANUP_STALE_TASKS = "mailworker.tasks.periodic.cleanup_stale_tasks"
RESUBMIT_DUE_SENDS = "mailworker.tasks.periodic.resubmit_due_sends"
CLASSIFY_UNSCORED = "mailworker.tasks.periodic.classify_unscored"


class Entry(NamedTuple):
    key: str
    value: Any
    reason: str


# How the broker connections fail instead of hanging (kombu's Redis transport honours each key).
_BROKER_CONNECTION: dict[str, Any] = {
    "socket_connect_timeout": 10,
    "socket_timeout": 30,
    "socket_keepalive": True,
    "socket_keepalive_options": keepalive.socket_options(),
    "health_check_interval": 25,
    "retry_on_timeout": False,
}
_BROKER_CONNECTION_REASON = (
    "a publish, ack or restore on a half-open connection fails after socket_timeout (30 s, far "
    "above BRPOP's 1 s server-side wait) instead of hanging the worker, and is retried by "
    "Celery's reconnect; keepalives close a silent connection after "
    f"{keepalive.DEAD_AFTER} s; kombu's health checks drop a stale BRPOP or pub/sub connection "
    "within BRPOP timeout + 2 x health_check_interval; retry_on_timeout stays off: it would "
    "replay any timed-out command on the same server; a publish is replayed once, through a "
    "fresh connection that asks the Sentinels (mailworker.redis_transport)."
)

_SENTINEL_REASON = (
    " With Sentinels, a discovery asks each Sentinel once (sentinel_kwargs), waiting at most "
    f"{SENTINEL_TIMEOUT:g} s: a frozen Sentinel costs that long per pool kombu opens, not "
    "redis-py's 11 attempts at the socket timeout."
)


def failover_reconnect_bound(s: Settings) -> float:
    """Seconds a worker may need to reach a new master after a Sentinel failover: its read on
    the old master's connection times out, a reconnect may meet the old master once more (the
    Sentinels named it until the switch), then every Sentinel is asked and the new master
    connected, each step at most its timeout."""
    connection = _BROKER_CONNECTION["socket_timeout"] + _BROKER_CONNECTION["socket_connect_timeout"]
    discovery = (
        2
        * len(s.redis_sentinels)
        * min(SENTINEL_TIMEOUT, _BROKER_CONNECTION["socket_connect_timeout"])
    )
    return 2 * connection + discovery


# A sweep restores a few messages in milliseconds; kombu's default keeps the lock 5 min.
_RESTORE_MUTEX_EXPIRE = 30


# Keys of kombu's unacked sweep for a monitoring process (see explain_config).
MONITOR_UNACKED_KEYS: dict[str, str] = {
    "unacked_key": "mailworker:monitor:unacked",
    "unacked_index_key": "mailworker:monitor:unacked_index",
    "unacked_mutex_key": "mailworker:monitor:unacked_mutex",
}


def explain_config(s: Settings, *, monitor: bool = False) -> list[Entry]:
    """(setting, value, reason) for every Celery setting the app sets; `monitor`: for Flower
    and the health checks, as the monitoring Redis user."""
    sentinel = sentinel_options(s, timeout=_BROKER_CONNECTION["socket_connect_timeout"])
    transport = {
        "visibility_timeout": s.visibility_timeout,
        redis_transport.LEASE_INTERVAL_OPTION: s.broker_lease_interval,
        "unacked_restore_interval": s.broker_restore_interval,
        "unacked_restore_throttle": 1,
        "unacked_mutex_expire": _RESTORE_MUTEX_EXPIRE,
        **_BROKER_CONNECTION,
        **sentinel,
    }
    if monitor and s.monitor_redis_user:
        # kombu sweeps the unacked index on the first poll of any consumer, even one that only
        # reads its own no-ack events and replies; the monitoring user may not read the app's
        # unacked payloads, so its processes sweep keys of their own (always empty).
        transport.update(MONITOR_UNACKED_KEYS)
    entries = [
        Entry(
            "broker_url",
            celery_url(s.broker_url, s, monitor=monitor),
            "Redis database 0 carries the queues; with Sentinels, kombu's sentinel:// form "
            "(the master is whichever the Sentinels name).",
        ),
        Entry(
            "result_backend",
            celery_url(s.result_backend, s, monitor=monitor),
            "Results live apart from queues (DB 1), on the same master.",
        ),
        Entry(
            "broker_transport_options",
            transport,
            "A worker renews the lease of each task it holds every unacked_lease_interval "
            "(mailworker.redis_transport); a task whose lease is older than visibility_timeout "
            "(a dead worker's) is redelivered by the next sweep (every unacked_restore_interval). "
            "A sweeper killed mid-sweep blocks the others for unacked_mutex_expire, not kombu's "
            "5 min. Timeouts and keepalives: " + _BROKER_CONNECTION_REASON + _SENTINEL_REASON,
        ),
        Entry(
            "result_backend_transport_options",
            {"visibility_timeout": s.visibility_timeout, **sentinel},
            "The result backend's Redis client must agree with the broker's visibility timeout "
            "and follow the same Sentinels to the same master.",
        ),
        # The result backend takes its connection options from redis_* settings, not from
        # result_backend_transport_options; it has no keepalive options, so the timeout bounds it.
        Entry(
            "redis_socket_timeout",
            _BROKER_CONNECTION["socket_timeout"],
            "A result read or write on a half-open connection fails after this, not after 120 s.",
        ),
        Entry(
            "redis_socket_connect_timeout",
            _BROKER_CONNECTION["socket_connect_timeout"],
            "An unreachable result backend fails fast (Celery waits forever by default).",
        ),
        Entry("redis_socket_keepalive", True, "Idle result connections notice a dead host."),
        Entry(
            "redis_backend_health_check_interval",
            _BROKER_CONNECTION["health_check_interval"],
            "PING a result connection idle this long before reusing it.",
        ),
        Entry(
            "redis_retry_on_timeout",
            False,
            "A timed-out write may have reached Redis: fail (and let the result retry decide), "
            "never replay blindly.",
        ),
        Entry(
            "broker_connection_retry_on_startup",
            True,
            "Redis may come up after the worker at boot; wait for it instead of exiting.",
        ),
        Entry(
            "broker_connection_retry",
            True,
            "Reconnect after Redis restarts instead of dying with in-flight tasks.",
        ),
        Entry(
            "broker_connection_max_retries",
            None,
            "Never give up reconnecting; the health timer reports a worker cut off from Redis.",
        ),
        Entry("task_serializer", "json", "JSON only: no pickle from the network."),
        Entry("result_serializer", "json", "JSON only: results are small dicts."),
        Entry("accept_content", ["json"], "Refuse pickled messages (code execution)."),
        Entry(
            "task_acks_late",
            True,
            "Acknowledge after the task ran, so a crash redelivers it (tasks are idempotent).",
        ),
        Entry(
            "task_reject_on_worker_lost",
            True,
            "A pool process killed mid-task requeues the task instead of failing it.",
        ),
        Entry(
            "task_acks_on_failure_or_timeout",
            True,
            "A task that failed or hit its hard limit is not redelivered in a loop.",
        ),
        Entry(
            "worker_deduplicate_successful_tasks",
            True,
            "A redelivered task that already stored SUCCESS is skipped, not run again.",
        ),
        Entry(
            "worker_prefetch_multiplier",
            s.prefetch_multiplier,
            "Mail tasks are long: reserve few so idle workers can take the rest.",
        ),
        Entry(
            "worker_cancel_long_running_tasks_on_connection_loss",
            False,
            "A running task outlives a Redis blip: its unacked entry lives in Redis, and the ack "
            "after the reconnect still removes it. Cancelling (prefork only; threads ignore it) "
            "killed sends mid-SMTP and, when Redis was down at that moment, left the task to wait "
            "out the visibility timeout. A copy requeued while the original runs is absorbed by "
            "the tasks' locks and ledgers, as on threads.",
        ),
        Entry(
            "worker_soft_shutdown_timeout",
            s.soft_shutdown_timeout,
            "On cold shutdown let running tasks finish for a while before they are requeued.",
        ),
        Entry(
            "worker_enable_soft_shutdown_on_idle",
            s.soft_shutdown_timeout > 0,
            "Soft shutdown also when idle, so retry countdowns held in memory go back to Redis.",
        ),
        Entry("worker_concurrency", s.concurrency, "Also applies without `mailworker run`."),
        Entry("worker_pool", s.pool, "Also applies without `mailworker run`."),
        Entry("task_time_limit", s.time_limit, "Kill a hung task (IMAP servers can stall)."),
        Entry(
            "task_soft_time_limit",
            s.soft_time_limit,
            "Raise SoftTimeLimitExceeded first so the task can close connections cleanly.",
        ),
        Entry("result_expires", s.result_expires, "Results are read within the hour, then go."),
        Entry(
            "result_backend_always_retry",
            True,
            "A Redis blip while storing a result retries instead of failing a finished task.",
        ),
        Entry(
            "result_backend_max_retries",
            10,
            "Bound those result-store retries.",
        ),
        Entry(
            "worker_send_task_events",
            s.task_events,
            "Flower and `celery events` see tasks only when workers send events.",
        ),
        Entry("task_send_sent_event", s.task_events, "Flower shows tasks while still queued."),
        Entry(
            "worker_consumer",
            "mailworker.consumer:Consumer",
            "Celery's consumer, publishing buffered task events once per EVENTS_FLUSH_EVERY of "
            "that module instead of about once per task (docs/benchmarks.md).",
        ),
        Entry(
            "task_track_started",
            False,
            "A STARTED result costs a GET, SETEX and PUBLISH per task (docs/benchmarks.md); the "
            "task-started event (Flower) and the task_attempts ledger already show running tasks.",
        ),
        Entry(
            "task_queues",
            [Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES],
            "One queue per kind of work, so a flood of syncs never delays a send.",
        ),
        Entry("task_routes", dict(TASK_QUEUES), "Each task lands on its own queue."),
        Entry(
            "task_default_queue",
            "periodic",
            "Celery's own housekeeping tasks go with the periodic work.",
        ),
        Entry(
            "task_create_missing_queues",
            False,
            "A typo in a route fails loudly instead of creating a queue nobody consumes.",
        ),
        Entry("include", list(TASK_MODULES), "The worker imports every task module."),
        Entry("beat_schedule", beat_schedule(s), "The schedule lives in the app, not in beat."),
        Entry(
            "beat_scheduler",
            "mailworker.beat:LeaseScheduler",
            "Beat may run on several hosts: the one holding a lease in Redis schedules, fenced "
            "by it; last runs and heartbeats live in Redis (mailworker.beat).",
        ),
        Entry(
            "beat_max_loop_interval",
            s.beat_max_loop_interval,
            "Tick at least this often: the leader renews its lease, a standby looks for a free "
            "one, each writes its heartbeat.",
        ),
        Entry("timezone", "UTC", "Schedules and timestamps in UTC."),
        Entry("enable_utc", True, "Schedules and timestamps in UTC."),
    ]
    if s.broker_url.startswith("rediss://"):
        entries.append(
            Entry("broker_use_ssl", tls_options(s), "Verify Redis's certificate on rediss://.")
        )
    if s.result_backend.startswith("rediss://"):
        entries.append(
            Entry(
                "redis_backend_use_ssl", tls_options(s), "Verify Redis's certificate on rediss://."
            )
        )
    return entries


def build_config(s: Settings, *, monitor: bool = False) -> dict[str, Any]:
    """The Celery configuration for these settings."""
    publish_time.install()
    return {entry.key: entry.value for entry in explain_config(s, monitor=monitor)}


def beat_schedule(s: Settings) -> dict[str, dict[str, Any]]:
    # `expires` drops a run nobody picked up before the next one is due, so a stopped fleet
    # does not find a backlog of identical fan-outs when it comes back.
    return {
        "sync-all-accounts": {
            "task": SYNC_ALL_ACCOUNTS,
            "schedule": schedule(timedelta(seconds=s.sync_interval)),
            "options": {"queue": "periodic", "expires": s.sync_interval},
        },
        "cleanup-stale-tasks": {
            "task": CLEANUP_STALE_TASKS,
            "schedule": schedule(timedelta(seconds=s.cleanup_interval)),
            "options": {"queue": "periodic", "expires": s.cleanup_interval},
        },
        # Its own entry, not part of cleanup: a send whose publish was lost waits one interval.
        "resubmit-due-sends": {
            "task": RESUBMIT_DUE_SENDS,
            "schedule": schedule(timedelta(seconds=s.send_sweep_interval)),
            "options": {"queue": "periodic", "expires": s.send_sweep_interval},
        },
        # Syncs queue classify_spam themselves; this queues what a lost publish left unscored.
        "classify-unscored": {
            "task": CLASSIFY_UNSCORED,
            "schedule": schedule(timedelta(seconds=s.classify_sweep_interval)),
            "options": {"queue": "periodic", "expires": s.classify_sweep_interval},
        },
    }
