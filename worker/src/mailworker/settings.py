"""Every MAILWORKER_* environment variable, declared once.

The `Settings` dataclass *is* the table: each field carries a `SettingSpec` (type, default,
description, secret flag) in its metadata. `load_settings()`, `mailworker config check` and the
README's settings table are all generated from it, so they cannot drift apart.
"""

from __future__ import annotations

import binascii
import ipaddress
import os
import re
from base64 import urlsafe_b64decode
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

from mailworker.errors import ConfigurationError

PREFIX: Final = "MAILWORKER_"
QUEUES: Final = ("sync", "send", "delete", "spam", "periodic")
POOLS: Final = ("prefork", "threads", "solo")
LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
MASK: Final = "********"


# --- value types -------------------------------------------------------------------------------
# Each parser turns the raw string into a value or raises ValueError with a message that never
# repeats a secret; `kind` is what the README's "type" column shows.


@dataclass(frozen=True)
class Integer:
    minimum: int = 0
    maximum: int | None = None

    @property
    def kind(self) -> str:
        if self.maximum is not None:
            return f"integer {self.minimum}..{self.maximum}"
        return f"integer >= {self.minimum}"

    def parse(self, raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError(f"expected a whole number, got {raw!r}") from None
        if value < self.minimum:
            raise ValueError(f"must be at least {self.minimum}, got {value}")
        if self.maximum is not None and value > self.maximum:
            raise ValueError(f"must be at most {self.maximum}, got {value}")
        return value


@dataclass(frozen=True)
class Number:
    minimum: float = 0.0

    @property
    def kind(self) -> str:
        return f"seconds >= {self.minimum:g}"

    def parse(self, raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ValueError(f"expected a number, got {raw!r}") from None
        if not value >= self.minimum:  # also rejects nan
            raise ValueError(f"must be at least {self.minimum:g}, got {raw.strip()}")
        return value


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


@dataclass(frozen=True)
class Boolean:
    kind: str = "boolean"

    def parse(self, raw: str) -> bool:
        word = raw.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise ValueError(f"expected true or false, got {raw!r}")


@dataclass(frozen=True)
class Choice:
    options: tuple[str, ...]
    case_insensitive: bool = False

    @property
    def kind(self) -> str:
        return "one of " + ", ".join(self.options)

    def parse(self, raw: str) -> str:
        value = raw.strip().upper() if self.case_insensitive else raw.strip()
        if value not in self.options:
            raise ValueError(f"expected one of {', '.join(self.options)}, got {raw!r}")
        return value


@dataclass(frozen=True)
class ChoiceList:
    options: tuple[str, ...]

    @property
    def kind(self) -> str:
        return "comma-separated, from " + ", ".join(self.options)

    def parse(self, raw: str) -> tuple[str, ...]:
        items = tuple(item.strip() for item in raw.split(",") if item.strip())
        if not items:
            raise ValueError("must name at least one of " + ", ".join(self.options))
        unknown = [item for item in items if item not in self.options]
        if unknown:
            raise ValueError(
                f"unknown {', '.join(unknown)} (expected some of {', '.join(self.options)})"
            )
        if len(set(items)) != len(items):
            raise ValueError("lists a name twice")
        return items


@dataclass(frozen=True)
class Text:
    kind: str = "text"
    pattern: str | None = None
    hint: str = ""

    def parse(self, raw: str) -> str:
        value = raw.strip()
        if self.pattern is not None and not re.fullmatch(self.pattern, value):
            raise ValueError(f"{self.hint}, got {raw!r}")
        return value


@dataclass(frozen=True)
class PrivateAddress:
    """An IP address that is not reachable from the internet: loopback or a private range."""

    kind: str = "loopback or private IP address"

    def parse(self, raw: str) -> str:
        value = raw.strip()
        try:
            address = ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(f"expected an IP address, got {raw!r}") from None
        if not (address.is_loopback or address.is_private) or address.is_unspecified:
            raise ValueError(f"must be a loopback or private address, got {value}")
        return value


@dataclass(frozen=True)
class TextList:
    kind: str = "comma-separated list"

    def parse(self, raw: str) -> tuple[str, ...]:
        items = tuple(item.strip() for item in raw.split(",") if item.strip())
        if not items:
            raise ValueError("must name at least one item")
        return items


@dataclass(frozen=True)
class HostPorts:
    kind: str = "comma-separated host:port"

    def parse(self, raw: str) -> tuple[tuple[str, int], ...]:
        found = []
        for item in (item.strip() for item in raw.split(",") if item.strip()):
            host, _, port = item.rpartition(":")
            host = host.removeprefix("[").removesuffix("]")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:  # noqa: PLR2004
                raise ValueError(f"expected host:port, got {item!r}")
            found.append((host, int(port)))
        if len(set(found)) != len(found):
            raise ValueError("lists an address twice")
        return tuple(found)


@dataclass(frozen=True)
class Path:
    kind: str = "path"
    optional: bool = False

    def parse(self, raw: str) -> str:
        value = raw.strip()
        if not value:
            if self.optional:
                return ""
            raise ValueError("must not be empty")
        if not value.startswith("/"):
            raise ValueError(f"must be an absolute path, got {raw!r}")
        return value


@dataclass(frozen=True)
class RedisUrl:
    kind: str = "redis:// or rediss:// URL"
    optional: bool = False

    def parse(self, raw: str) -> str:
        value = raw.strip()
        if not value and self.optional:
            return ""
        parts = urlsplit(value)
        if parts.scheme not in ("redis", "rediss") or not parts.hostname:
            raise ValueError(
                f"expected redis://[:password@]host:port/db or rediss://..., "
                f"got {mask_url(value)!r}"
            )
        try:
            parts.port  # noqa: B018 - raises ValueError on a malformed port
        except ValueError:
            raise ValueError(f"has a malformed port in {mask_url(value)!r}") from None
        database = parts.path.lstrip("/")
        if database and not database.isdigit():
            raise ValueError(f"database must be a number, got {mask_url(value)!r}")
        return value


@dataclass(frozen=True)
class DatabaseUrl:
    kind: str = "postgresql+psycopg2:// URL"
    optional: bool = False

    def parse(self, raw: str) -> str:
        value = raw.strip()
        if not value and self.optional:
            return ""
        parts = urlsplit(value)
        if not parts.scheme.startswith("postgresql") or not (parts.hostname or parts.query):
            raise ValueError(
                f"expected postgresql+psycopg2://user:password@host:port/dbname, "
                f"got {mask_url(value)!r}"
            )
        return value


@dataclass(frozen=True)
class FernetKeys:
    kind: str = "comma-separated Fernet keys"

    def parse(self, raw: str) -> tuple[str, ...]:
        keys = tuple(key.strip() for key in raw.split(",") if key.strip())
        if not keys:
            raise ValueError("must hold at least one Fernet key")
        for position, key in enumerate(keys, start=1):
            if not _is_fernet_key(key):
                raise ValueError(
                    f"key {position} of {len(keys)} is not a Fernet key "
                    "(32 url-safe base64-encoded bytes; make one with `mailworker config new-key`)"
                )
        return keys


def _is_fernet_key(key: str) -> bool:
    try:
        return len(urlsafe_b64decode(key.encode("ascii"))) == 32  # noqa: PLR2004 - Fernet's size
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return False


Parser = (
    Integer
    | Number
    | Boolean
    | Choice
    | ChoiceList
    | Text
    | TextList
    | PrivateAddress
    | HostPorts
    | Path
    | RedisUrl
    | DatabaseUrl
    | FernetKeys
)


@dataclass(frozen=True)
class SettingSpec:
    """One row of the table. `default=None` means required."""

    parser: Parser
    description: str
    default: str | None = None
    secret: bool = False
    default_note: str = ""  # what an empty default means, for the README

    @property
    def required(self) -> bool:
        return self.default is None


def _setting(
    parser: Parser,
    description: str,
    default: str | None = None,
    *,
    secret: bool = False,
    default_note: str = "",
) -> Any:
    spec = SettingSpec(parser, description, default, secret, default_note)
    return field(metadata={"spec": spec})


# --- the table ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Effective settings; attribute = variable name without MAILWORKER_, lower case."""

    # Connections
    broker_url: str = _setting(RedisUrl(), "Redis broker, database 0.")
    result_backend: str = _setting(
        RedisUrl(optional=True),
        "Redis result backend.",
        "",
        default_note="the broker URL with database 1",
    )
    database_url: str = _setting(DatabaseUrl(), "PostgreSQL for accounts and messages.")
    migration_database_url: str = _setting(
        DatabaseUrl(optional=True),
        "PostgreSQL as the schema's owner, for `mailworker db upgrade` and `db current` only (the "
        "workers' role cannot change the schema).",
        "",
        default_note="MAILWORKER_DATABASE_URL",
    )
    encryption_keys: tuple[str, ...] = _setting(
        FernetKeys(),
        "Fernet keys for mail passwords; the first encrypts, all decrypt (rotation).",
        secret=True,
    )
    redis_tls_verify: bool = _setting(
        Boolean(), "Verify the Redis server certificate on rediss:// URLs.", "true"
    )
    redis_ca_file: str = _setting(
        Path(optional=True), "CA bundle for rediss:// (empty: system store).", ""
    )
    redis_sentinels: tuple[tuple[str, int], ...] = _setting(
        HostPorts(),
        "Redis Sentinels (host:port) that name the current master; empty: no Sentinel. With "
        "them, the host and port of the broker and result backend URLs are not used (their "
        "scheme, user, password and database are): every Redis client asks the Sentinels.",
        "",
        default_note="empty (no Sentinel)",
    )
    redis_master_name: str = _setting(
        Text(pattern=r"[A-Za-z0-9._-]+", hint="expected a Sentinel master name"),
        "Name of the master the Sentinels monitor.",
        "mailworker",
    )
    redis_sentinel_password: str = _setting(
        Text(), "Password of the Sentinels (their requirepass); empty: none.", "", secret=True
    )
    monitor_redis_user: str = _setting(
        Text(pattern=r"[^\s:@/]*", hint="expected an ACL user name"),
        "Redis ACL user of Flower and `mailworker health` (reads queue lengths, events and "
        "pings, cannot take or delete tasks); empty: they use the broker URL's user.",
        "",
    )
    monitor_redis_password: str = _setting(
        Text(), "Password of that monitoring user.", "", secret=True
    )
    # Worker process
    concurrency: int = _setting(Integer(minimum=1), "Pool processes or threads.", "4")
    pool: str = _setting(Choice(POOLS), "Execution pool.", "prefork")
    queues: tuple[str, ...] = _setting(
        ChoiceList(QUEUES), "Queues this worker consumes.", ",".join(QUEUES)
    )
    node_name: str = _setting(
        Text(kind="name@host", pattern=r"[^\s@]+@[^\s@]+", hint="expected name@host"),
        "Worker node name (%h = host name).",
        "celery-worker@%h",
    )
    time_limit: int = _setting(
        Integer(minimum=1),
        "Hard time limit per task (s), enforced on prefork; units stop within it (+ grace).",
        "1260",
    )
    soft_time_limit: int = _setting(
        Integer(minimum=1),
        "Soft time limit per task (s); below the hard one, above the longest task (a send: "
        "SMTP plus IMAP deadline).",
        "1200",
    )
    soft_shutdown_timeout: float = _setting(
        Number(),
        "On cold shutdown, seconds running tasks may still finish (0 = off).",
        "30",
    )
    prefetch_multiplier: int = _setting(
        Integer(minimum=1), "Messages reserved per pool process.", "1"
    )
    max_memory_per_child_kib: int = _setting(
        Integer(),
        "Prefork only: resident memory (KiB) of a pool process after which it is replaced once "
        "its task ends (Celery's --max-memory-per-child; 0 = never). The supervisor role sets it "
        "from the unit's memory ceiling, which systemd enforces with MemoryMax= instead.",
        "0",
    )
    visibility_timeout: int = _setting(
        Integer(minimum=1),
        "Seconds an unacknowledged task's lease lasts unrenewed: a worker renews the leases of "
        "the tasks it holds every BROKER_LEASE_INTERVAL, so this bounds how long a dead "
        "worker's tasks wait (plus the restore interval); at least 3 lease intervals. Not tied "
        "to task duration or retry countdowns, except on the solo pool (then above TIME_LIMIT).",
        "60",
    )
    broker_lease_interval: int = _setting(
        Integer(minimum=1),
        "Seconds between a worker's renewals of the leases of the tasks it holds (running, "
        "reserved and waiting for their ETA).",
        "10",
    )
    broker_restore_interval: int = _setting(
        Integer(minimum=1),
        "Seconds between sweeps that redeliver tasks whose lease ran out (a lost worker's).",
        "10",
    )
    result_expires: int = _setting(Integer(minimum=1), "Seconds task results are kept.", "3600")
    task_events: bool = _setting(
        Boolean(),
        "Send task events (Flower sees tasks), a worker's in batches at most 0.5 s late "
        "(`mailworker/consumer.py`); false also stops Flower from turning them on.",
        "true",
    )
    # Retries
    retry_backoff_base: int = _setting(
        Integer(minimum=1),
        "First retry delay (s); doubles each retry: a dropped connection is retried at once.",
        "2",
    )
    retry_backoff_max: int = _setting(
        Integer(minimum=1),
        "Longest retry delay (s): a long outage is probed every 5 min on average.",
        "600",
    )
    retry_jitter: bool = _setting(
        Boolean(),
        "Randomise retry delays (full jitter), so tasks hit by one outage do not retry together.",
        "true",
    )
    retry_window: int = _setting(
        Integer(minimum=1),
        "Seconds from a task's first attempt during which a transient failure is retried (sync "
        "and periodic tasks): rides out an IMAP or PostgreSQL restart; after that the next "
        "scheduled sync (every 5 min) does the work anyway.",
        "900",
    )
    max_retries: int = _setting(
        Integer(),
        "Backstop on retries of one task whatever its window (the windows are the budget): "
        "1000 delays of 300 s on average at the backoff cap last about 3.5 days.",
        "1000",
    )
    max_redeliveries: int = _setting(
        Integer(),
        "Times one task may take its worker down (killed mid-task, e.g. out of memory) and be "
        "redelivered; then it fails without running. A deploy or crash costs one.",
        "3",
    )
    # Logging
    log_level: str = _setting(Choice(LOG_LEVELS, case_insensitive=True), "Log level.", "INFO")
    log_file: str = _setting(
        Path(optional=True),
        "Log file of worker and beat; `{service}` in it becomes worker or beat (Flower logs "
        "to stderr).",
        "",
        default_note="stderr (the journal)",
    )
    # Mail
    sync_batch_size: int = _setting(Integer(minimum=1), "Messages fetched per IMAP batch.", "100")
    max_message_size: int = _setting(
        Integer(minimum=1024),
        "Largest message synced or sent (bytes); larger ones are skipped by sync, refused by send.",
        "26214400",
    )
    sync_batch_bytes: int = _setting(
        Integer(minimum=65536),
        "Message bytes fetched per IMAP batch (a larger message comes alone); 8 MiB holds 100 "
        "ordinary mails, so it splits only batches of large mail and bounds a sync's memory.",
        "8388608",
    )
    mail_memory_budget: int = _setting(
        Integer(minimum=1024 * 1024),
        "Message bytes the syncs and sends of one worker process may hold at once (the rest "
        "wait; a send counts 3x its size): held about 3x in memory, 96 MiB keeps a 20-thread "
        "worker well under its 512M MemoryMax.",
        "100663296",
    )
    sync_folders: tuple[str, ...] = _setting(TextList(), "Folders `sync_mailbox` reads.", "INBOX")
    imap_timeout: float = _setting(Number(minimum=1), "IMAP socket timeout (s).", "30")
    smtp_timeout: float = _setting(Number(minimum=1), "SMTP socket timeout (s).", "30")
    smtp_final_reply_timeout: float = _setting(
        Number(minimum=1),
        "Wait for the reply to a message's final '.' (s); RFC 5321 4.5.3.2.6 gives it 10 min.",
        "600",
    )
    send_retry_window: int = _setting(
        Integer(minimum=60),
        "Seconds a send keeps being retried before it fails; a day outlasts an overnight outage.",
        "86400",
    )
    send_sweep_interval: int = _setting(
        Integer(minimum=1),
        "Seconds between sweeps that resubmit due sends; a minute, so a lost publish waits little.",
        "60",
    )
    imap_deadline: float = _setting(
        Number(minimum=1),
        "Wall-clock limit of one whole IMAP session (s), on any pool; below the soft time "
        "limit (a cut-short sync resumes after its last stored batch).",
        "240",
    )
    smtp_deadline: float = _setting(
        Number(minimum=1),
        "Wall-clock limit of one whole SMTP exchange (s), on any pool: RFC 5321's 10 min for "
        "the reply to the final `.` plus 5 min for the rest.",
        "900",
    )
    smtp_idle_reuse: float = _setting(
        Number(),
        "Seconds an authenticated SMTP connection is kept per account after a clean send, for "
        "that account's next send (0 = a new session per mail): well below the 5 min after "
        "which servers drop idle clients (RFC 5321 4.5.3.2.7).",
        "60",
    )
    imap_idle_reuse: float = _setting(
        Number(),
        "Seconds the IMAP session of a send's copy to Sent is kept per account for the next "
        "copy (0 = a login per copy): as long as the SMTP one, far below the 30 min an idle "
        "IMAP client may stay (RFC 9051 5.4).",
        "60",
    )
    mail_reuse_max_messages: int = _setting(
        Integer(minimum=1),
        "Messages one kept SMTP connection or IMAP session carries before it is closed, so no "
        "session lives on for ever under steady traffic.",
        "100",
    )
    mail_reuse_max_connections: int = _setting(
        Integer(minimum=1),
        "Idle SMTP connections, and idle IMAP sessions, one worker process keeps (one coming "
        "back to a full cache is closed): as many as a threads instance's 20 threads, so a "
        "host holds at most twice as many connections to a server as it runs sending threads.",
        "20",
    )
    imap_tls_verify: bool = _setting(Boolean(), "Verify IMAP server certificates.", "true")
    smtp_tls_verify: bool = _setting(Boolean(), "Verify SMTP server certificates.", "true")
    mail_ca_file: str = _setting(
        Path(optional=True), "CA bundle for IMAP and SMTP (empty: system store).", ""
    )
    sent_folder: str = _setting(Text(), "Folder a sent message is copied to.", "Sent")
    trash_folder: str = _setting(Text(), "Folder `delete_messages` moves to.", "Trash")
    junk_folder: str = _setting(Text(), "Folder `classify_spam` moves spam to.", "Junk")
    action_retry_window: int = _setting(
        Integer(minimum=60),
        "Seconds a delete or spam move keeps being retried and resubmitted before it is marked "
        "failed: a day outlasts an overnight IMAP outage, later the user's intent is stale.",
        "86400",
    )
    # Periodic work
    sync_interval: int = _setting(
        Integer(minimum=1), "Seconds between `sync_all_accounts` runs.", "300"
    )
    cleanup_interval: int = _setting(
        Integer(minimum=1), "Seconds between `cleanup_stale_tasks` runs.", "3600"
    )
    classify_sweep_interval: int = _setting(
        Integer(minimum=1),
        "Seconds between sweeps that queue `classify_spam` for synced messages still unscored "
        "CLASSIFY_GRACE after they were stored (the sync's own publish was lost).",
        "300",
    )
    classify_grace: int = _setting(
        Integer(minimum=60),
        "Seconds a synced message may stay unscored before the sweep queues it again: above a "
        "normal classification's wait in the spam queue, so the sweep rarely doubles one.",
        "600",
    )
    stale_after: int = _setting(
        Integer(minimum=1),
        "Seconds after which unfinished task state counts as stuck; above the visibility timeout.",
        "7200",
    )
    task_history_retention: int = _setting(
        Integer(minimum=1),
        "Seconds finished task attempts stay in the database; above STALE_AFTER.",
        "604800",
    )
    beat_name: str = _setting(
        Text(kind="name@host", pattern=r"[^\s@]+@[^\s@]+", hint="expected name@host"),
        "Beat's name in its lease and heartbeat (%h = host name); one per beat.",
        "celery-beat@%h",
    )
    beat_max_loop_interval: int = _setting(
        Integer(minimum=1),
        "Longest sleep of beat between ticks (s): the leader renews its lease, a standby "
        "looks for a free one, at least this often.",
        "5",
    )
    beat_lease: int = _setting(
        Integer(minimum=2),
        "Seconds the leading beat's lease lasts unrenewed: a standby takes over at most this "
        "long after the leader's last tick. At least twice the loop interval, below the "
        "shortest periodic interval.",
        "30",
    )
    beat_heartbeat_max_age: int = _setting(
        Integer(minimum=1),
        "`health beat` fails when beat's last tick is older (s); above the loop interval.",
        "120",
    )
    health_timeout: float = _setting(Number(minimum=0.1), "Default `health` timeout (s).", "10")
    worker_stuck_after: int = _setting(
        Integer(minimum=30),
        "`health worker` fails when the worker, answering pings, has had tasks waiting in its "
        "queues and a free slot yet received nothing for this long (s), or stopped recording "
        "its progress (every 10 s); at least 30.",
        "60",
    )
    # Flower
    flower_address: str = _setting(Text(), "Flower listen address.", "127.0.0.1")
    flower_port: int = _setting(Integer(minimum=1, maximum=65535), "Flower port.", "5555")
    flower_url_prefix: str = _setting(
        Text(pattern=r"[A-Za-z0-9._~/-]*", hint="expected a URL path"),
        "Flower URL prefix (behind the proxy).",
        "flower",
    )
    flower_persistent: bool = _setting(
        Boolean(),
        "Save Flower's task history (task arguments and results) to FLOWER_DB; off: none on disk.",
        "false",
    )
    flower_db: str = _setting(
        Path(), "Flower's state file.", "/var/lib/mailworker/flower/flower.db"
    )
    flower_read_only: bool = _setting(
        Boolean(), "Disable Flower's control operations; an older Flower refuses to start.", "true"
    )
    # Metrics
    metrics_address: str = _setting(
        PrivateAddress(),
        "Address `mailworker metrics serve` listens on (loopback or a private address only).",
        "127.0.0.1",
    )
    metrics_port: int = _setting(
        Integer(minimum=1, maximum=65535), "Port of `mailworker metrics serve`.", "9809"
    )


SETTINGS: Final[dict[str, SettingSpec]] = {
    PREFIX + f.name.upper(): f.metadata["spec"] for f in fields(Settings)
}
_ATTRIBUTE: Final = {PREFIX + f.name.upper(): f.name for f in fields(Settings)}


# --- loading -----------------------------------------------------------------------------------


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read, parse and cross-check every setting; ConfigurationError names the first bad one."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name, spec in SETTINGS.items():
        raw = env.get(name)
        if raw is None or (raw.strip() == "" and spec.required):
            if spec.required:
                raise ConfigurationError(f"{name} is required but not set")
            raw = spec.default
        assert raw is not None
        try:
            value = spec.parser.parse(raw)
        except ValueError as error:
            raise ConfigurationError(f"{name}: {error}") from None
        values[_ATTRIBUTE[name]] = value
    if not values["result_backend"]:
        values["result_backend"] = _with_database(values["broker_url"], 1)
    if not values["migration_database_url"]:
        values["migration_database_url"] = values["database_url"]
    settings = Settings(**values)
    for check in _RELATIONS:
        check(settings)
    return settings


def _with_database(url: str, database: int) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


def _soft_below_hard(s: Settings) -> None:
    if s.soft_time_limit >= s.time_limit:
        raise ConfigurationError(
            f"{PREFIX}SOFT_TIME_LIMIT ({s.soft_time_limit}) must be below "
            f"{PREFIX}TIME_LIMIT ({s.time_limit})"
        )


def _visibility_above_lease_interval(s: Settings) -> None:
    # A lease that lapses between two renewals of a live worker hands its running task to another
    # worker; three intervals let one renewal be late or fail (a Redis blip) without that.
    if s.visibility_timeout < 3 * s.broker_lease_interval:
        raise ConfigurationError(
            f"{PREFIX}VISIBILITY_TIMEOUT ({s.visibility_timeout}) must be at least 3 x "
            f"{PREFIX}BROKER_LEASE_INTERVAL ({3 * s.broker_lease_interval}): a live worker's "
            "task would be redelivered after one late renewal"
        )
    # The solo pool runs a task in the event loop itself: no renewal until it ends, so the
    # timeout has to outlast the task and any countdown, as without leases.
    longest = max(s.time_limit, s.retry_backoff_max)
    if s.pool == "solo" and s.visibility_timeout <= longest:
        raise ConfigurationError(
            f"{PREFIX}VISIBILITY_TIMEOUT ({s.visibility_timeout}) must be above "
            f"{PREFIX}TIME_LIMIT and {PREFIX}RETRY_BACKOFF_MAX ({longest}) with "
            f"{PREFIX}POOL=solo, which cannot renew leases while a task runs"
        )


def _time_limits_above_mail_deadlines(s: Settings) -> None:
    # A mail session must end by its own deadline (a clean TransientError) before the soft time
    # limit interrupts it, and the units' stop timeout (hard limit + grace) must outlast it.
    deadlines = []
    if "send" in s.queues:
        deadlines.append(("SMTP_DEADLINE", s.smtp_deadline))
    if set(s.queues) & {"sync", "send", "delete", "spam"}:
        deadlines.append(("IMAP_DEADLINE", s.imap_deadline))
    for name, seconds in deadlines:
        if s.soft_time_limit <= seconds:
            raise ConfigurationError(
                f"{PREFIX}SOFT_TIME_LIMIT ({s.soft_time_limit}) must be above {PREFIX}{name} "
                f"({seconds:g}) on a worker consuming {','.join(s.queues)}"
            )


def _smtp_deadline_above_final_reply(s: Settings) -> None:
    # The deadline bounds the whole exchange, so it must leave the final reply its full wait.
    if s.smtp_deadline <= s.smtp_final_reply_timeout:
        raise ConfigurationError(
            f"{PREFIX}SMTP_DEADLINE ({s.smtp_deadline:g}) must be above "
            f"{PREFIX}SMTP_FINAL_REPLY_TIMEOUT ({s.smtp_final_reply_timeout:g})"
        )


def _memory_budget_holds_a_message(s: Settings) -> None:
    if s.mail_memory_budget < s.max_message_size:
        raise ConfigurationError(
            f"{PREFIX}MAIL_MEMORY_BUDGET ({s.mail_memory_budget}) must be at least "
            f"{PREFIX}MAX_MESSAGE_SIZE ({s.max_message_size}): a message that fits alone "
            "must be able to run"
        )


def _stale_above_visibility(s: Settings) -> None:
    if s.stale_after <= s.visibility_timeout + s.time_limit:
        raise ConfigurationError(
            f"{PREFIX}STALE_AFTER ({s.stale_after}) must be above {PREFIX}VISIBILITY_TIMEOUT "
            f"+ {PREFIX}TIME_LIMIT ({s.visibility_timeout + s.time_limit}): a redelivered task "
            "must not be declared stuck"
        )


def _retention_above_stale(s: Settings) -> None:
    if s.task_history_retention <= s.stale_after:
        raise ConfigurationError(
            f"{PREFIX}TASK_HISTORY_RETENTION ({s.task_history_retention}) must be above "
            f"{PREFIX}STALE_AFTER ({s.stale_after})"
        )


def _backoff_order(s: Settings) -> None:
    if s.retry_backoff_base > s.retry_backoff_max:
        raise ConfigurationError(
            f"{PREFIX}RETRY_BACKOFF_BASE ({s.retry_backoff_base}) must not exceed "
            f"{PREFIX}RETRY_BACKOFF_MAX ({s.retry_backoff_max})"
        )


def _memory_per_child_on_prefork(s: Settings) -> None:
    # Celery reads it only in the prefork pool: on threads or solo it would limit nothing.
    if s.max_memory_per_child_kib and s.pool != "prefork":
        raise ConfigurationError(
            f"{PREFIX}MAX_MEMORY_PER_CHILD_KIB ({s.max_memory_per_child_kib}) applies to the "
            f"prefork pool only, not {PREFIX}POOL={s.pool}: set it on the prefork units alone"
        )


def _heartbeat_above_loop(s: Settings) -> None:
    if s.beat_heartbeat_max_age <= s.beat_max_loop_interval:
        raise ConfigurationError(
            f"{PREFIX}BEAT_HEARTBEAT_MAX_AGE ({s.beat_heartbeat_max_age}) must be above "
            f"{PREFIX}BEAT_MAX_LOOP_INTERVAL ({s.beat_max_loop_interval})"
        )


# The settings behind celery_config.beat_schedule's intervals (tests/test_settings.py checks
# that the schedule uses exactly these).
PERIODIC_INTERVALS: Final = (
    "SYNC_INTERVAL",
    "CLEANUP_INTERVAL",
    "SEND_SWEEP_INTERVAL",
    "CLASSIFY_SWEEP_INTERVAL",
)


def _beat_lease_between_loop_and_periods(s: Settings) -> None:
    # The leader renews once a loop: a lease a slow loop can outlive makes the leader give up
    # (celery-redbeat #230 crash-looped at 1.5 loops). A failover delays the periodic runs by up
    # to the lease, which must stay below every interval so no run waits a whole extra period.
    if s.beat_lease < 2 * s.beat_max_loop_interval:
        raise ConfigurationError(
            f"{PREFIX}BEAT_LEASE ({s.beat_lease}) must be at least twice "
            f"{PREFIX}BEAT_MAX_LOOP_INTERVAL ({s.beat_max_loop_interval}): the leader renews "
            "it once a loop"
        )
    name, seconds = min(
        ((name, getattr(s, name.lower())) for name in PERIODIC_INTERVALS), key=lambda x: x[1]
    )
    if s.beat_lease >= seconds:
        raise ConfigurationError(
            f"{PREFIX}BEAT_LEASE ({s.beat_lease}) must be below {PREFIX}{name} ({seconds}), "
            "the shortest periodic interval: a beat failover delays periodic runs by up to "
            "the lease"
        )


def _monitor_user_with_password(s: Settings) -> None:
    if bool(s.monitor_redis_user) != bool(s.monitor_redis_password):
        raise ConfigurationError(
            f"{PREFIX}MONITOR_REDIS_USER and {PREFIX}MONITOR_REDIS_PASSWORD: set both or neither"
        )


def _sentinel_result_backend_on_redis(s: Settings) -> None:
    if s.redis_sentinels and s.result_backend.startswith("rediss://") != s.broker_url.startswith(
        "rediss://"
    ):
        raise ConfigurationError(
            f"{PREFIX}REDIS_SENTINELS: the broker and the result backend are the same Redis "
            "master, so their URLs must both use redis:// or both rediss://"
        )


_RELATIONS: Final[tuple[Callable[[Settings], None], ...]] = (
    _soft_below_hard,
    _time_limits_above_mail_deadlines,
    _smtp_deadline_above_final_reply,
    _visibility_above_lease_interval,
    _stale_above_visibility,
    _retention_above_stale,
    _backoff_order,
    _heartbeat_above_loop,
    _beat_lease_between_loop_and_periods,
    _memory_budget_holds_a_message,
    _memory_per_child_on_prefork,
    _monitor_user_with_password,
    _sentinel_result_backend_on_redis,
)


# --- display -----------------------------------------------------------------------------------


def mask_url(url: str) -> str:
    """The URL with its password replaced by a mask (each address of a sentinel:// list)."""
    if ";" in url:
        return ";".join(mask_url(chunk) for chunk in url.split(";"))
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:{MASK}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def display_value(name: str, value: Any) -> str:  # noqa: PLR0911 - one return per kind
    """How `config check` shows a value: secrets masked, passwords cut out of URLs."""
    spec = SETTINGS[name]
    if spec.secret and not isinstance(value, tuple):
        return MASK if value else '""'
    if spec.secret:
        count = len(value)
        return f"{MASK} ({count} key{'s' if count != 1 else ''})"
    if isinstance(spec.parser, RedisUrl | DatabaseUrl) or name == f"{PREFIX}RESULT_BACKEND":
        return mask_url(str(value))
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(spec.parser, HostPorts):
        return ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in value) or '""'
    if isinstance(value, tuple):
        return ",".join(value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value) if value != "" else '""'  # an empty value stays visible


def effective(settings: Settings) -> list[tuple[str, str]]:
    """(variable, displayed value) for every setting, in table order."""
    return [(name, display_value(name, getattr(settings, _ATTRIBUTE[name]))) for name in SETTINGS]


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """MAILWORKER_* variables that no setting declares (most likely typos)."""
    env = os.environ if environ is None else environ
    return sorted(name for name in env if name.startswith(PREFIX) and name not in SETTINGS)


def markdown_table() -> str:
    """The README's settings table."""
    lines = [
        "| Variable | Type | Default | Description |",
        "|---|---|---|---|",
    ]
    for name, spec in SETTINGS.items():
        if spec.required:
            default = "**required**"
        elif spec.default_note:
            default = spec.default_note
        else:
            default = f"`{spec.default}`" if spec.default else "empty"
        description = spec.description + (" Secret: masked in output." if spec.secret else "")
        kind = spec.parser.kind.replace("|", "\\|")
        lines.append(f"| `{name}` | {kind} | {default} | {description} |")
    return "\n".join(lines) + "\n"
