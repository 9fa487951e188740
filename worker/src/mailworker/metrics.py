"""The application's own metrics, which only it can read, for Prometheus.

`mailworker metrics serve` answers every scrape by reading the broker's Redis and PostgreSQL
at that moment (nothing is cached, nothing runs between scrapes):

- per queue: waiting messages, the age of the oldest one (publish_time's header), unacked ones;
- per account (labelled by its id, never by address): seconds since its last complete sync;
- outbox rows still in flight or needing attention (queued, sending, deferred, unknown);
- task_attempts rows by task and state (the retained history, see TASK_HISTORY_RETENTION);
- every beat's last tick (LeaseScheduler's heartbeat) with its role;
- mailworker_metrics_source_up per source, so an unreachable Redis or PostgreSQL shows as 0
  instead of failing the whole scrape.

Labels carry queue names, account and task ids, task names, states and beat names only.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from celery import Celery
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Engine, create_engine, text

from mailworker import publish_time
from mailworker.beat import HEARTBEAT_PREFIX
from mailworker.celery_config import build_config
from mailworker.ops.broker import CONNECTION_ERRORS, Broker, BrokerKeys, decode_json, plain_client
from mailworker.ops.queues import configured_queues, unacked_by_queue
from mailworker.settings import Settings

logger = logging.getLogger(__name__)

# Outbox states worth watching; sent and failed rows only grow and are not counted each scrape.
OUTBOX_STATES = ("queued", "sending", "deferred", "unknown")

# The stalest synced folder dates an account: it is synced only when all its folders are. An
# account with a folder never synced counts from its creation.
SYNC_LAG_SQL = text(
    """
    SELECT a.id::text AS account_id,
           extract(epoch FROM now() - CASE
               WHEN count(f.folder) < :folder_count OR bool_or(f.synced_at IS NULL)
               THEN a.created_at ELSE min(f.synced_at) END) AS lag
    FROM mail_accounts a
    JOIN tenants t ON t.id = a.tenant_id
    LEFT JOIN folder_sync_states f ON f.account_id = a.id AND f.folder = ANY(:folders)
    WHERE a.active AND t.active
    GROUP BY a.id, a.created_at
    """
)
OUTBOX_SQL = text(
    "SELECT status, count(*) FROM sent_messages WHERE status = ANY(:states) GROUP BY status"
)
ATTEMPTS_SQL = text("SELECT task_name, state, count(*) FROM task_attempts GROUP BY 1, 2")


def _source(name: str, up: bool) -> GaugeMetricFamily:
    family = GaugeMetricFamily(
        "mailworker_metrics_source_up",
        "1 when this scrape could read the source (broker Redis, PostgreSQL), else 0.",
        labels=["source"],
    )
    family.add_metric([name], 1 if up else 0)
    return family


class AppCollector(Collector):
    """Reads Redis and PostgreSQL on every collect(); one source failing leaves the other."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        app = Celery("mailworker-metrics", set_as_current=False)
        app.conf.update(build_config(settings))
        self.app = app
        self.keys = BrokerKeys.from_app(app)
        self.queues = configured_queues(app)
        self._engine: Engine | None = None

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            timeout = max(1, int(self.settings.health_timeout))
            self._engine = create_engine(
                self.settings.database_url,
                pool_pre_ping=True,
                hide_parameters=True,
                pool_size=1,
                max_overflow=0,
                connect_args={
                    "connect_timeout": timeout,
                    "application_name": "mailworker-metrics",
                    "options": f"-c statement_timeout={timeout * 1000}",
                },
            )
        return self._engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        interval = GaugeMetricFamily(
            "mailworker_sync_interval_seconds",
            "MAILWORKER_SYNC_INTERVAL: how often every account should be synced.",
        )
        interval.add_metric([], self.settings.sync_interval)
        yield interval
        yield from self._from_broker()
        yield from self._from_database()

    # --- Redis ---------------------------------------------------------------------------------

    def _from_broker(self) -> Iterator[GaugeMetricFamily]:
        client = plain_client(
            str(self.app.conf.broker_url),
            self.app.conf.broker_use_ssl,
            self.settings.health_timeout,
            self.app.conf.broker_transport_options,
        )
        try:
            broker = Broker(client=client, keys=self.keys, url=str(self.app.conf.broker_url))
            families = self._broker_families(broker)
        except CONNECTION_ERRORS as error:
            logger.warning("metrics: broker not readable: %s", type(error).__name__)
            yield _source("broker", False)
            return
        finally:
            client.close()
        yield from families
        yield _source("broker", True)

    def _broker_families(self, broker: Broker) -> list[GaugeMetricFamily]:
        waiting = GaugeMetricFamily(
            "mailworker_queue_messages",
            "Task messages waiting in the queue (not yet delivered to a worker).",
            labels=["queue"],
        )
        oldest = GaugeMetricFamily(
            "mailworker_queue_oldest_message_age_seconds",
            "Seconds since the oldest waiting message was published (0: none waiting).",
            labels=["queue"],
        )
        unacked_family = GaugeMetricFamily(
            "mailworker_queue_unacked_messages",
            "Messages delivered to a worker and not acknowledged yet (kombu's unacked hash).",
            labels=["queue"],
        )
        unacked, _overdue = unacked_by_queue(broker)
        now = time.time()
        for queue in self.queues:
            keys = broker.keys.queue_keys(queue)
            pipe = broker.client.pipeline(transaction=False)
            for key in keys:
                pipe.llen(key)
                pipe.lindex(key, -1)  # kombu LPUSHes and BRPOPs: the oldest is the last
            replies = pipe.execute()
            waiting.add_metric([queue], sum(int(n) for n in replies[::2]))
            stamps = [_published_at(raw) for raw in replies[1::2] if raw is not None]
            known = [s for s in stamps if s is not None]
            oldest.add_metric([queue], max(0.0, now - min(known)) if known else 0.0)
            unacked_family.add_metric([queue], unacked.pop(queue, 0))
        for queue, count in sorted(unacked.items()):
            unacked_family.add_metric([queue], count)

        beats = GaugeMetricFamily(
            "mailworker_beat_last_tick_timestamp_seconds",
            "Unix time of each beat's last tick (LeaseScheduler's heartbeat); role: leader or "
            "standby.",
            labels=["beat", "role"],
        )
        prefix = HEARTBEAT_PREFIX  # beat writes it outside kombu's key prefix (mailworker.beat)
        names = [raw for raw in broker.client.scan_iter(match=prefix + "*", count=500)]
        values = broker.client.mget(names) if names else []
        for raw_name, value in zip(names, values, strict=True):
            if value is None:
                continue
            stamp, _, role = value.decode().partition(" ")
            beats.add_metric([raw_name.decode()[len(prefix) :], role or "unknown"], float(stamp))
        return [waiting, oldest, unacked_family, beats]

    # --- PostgreSQL ----------------------------------------------------------------------------

    def _from_database(self) -> Iterator[GaugeMetricFamily]:
        lag = GaugeMetricFamily(
            "mailworker_account_sync_lag_seconds",
            "Seconds since the account's last complete sync (every folder of SYNC_FOLDERS), "
            "labelled by account id.",
            labels=["account_id"],
        )
        outbox = GaugeMetricFamily(
            "mailworker_outbox_messages",
            "Sends in the outbox by status (queued, sending, deferred, unknown).",
            labels=["status"],
        )
        attempts = GaugeMetricFamily(
            "mailworker_task_attempts",
            "Rows in task_attempts by task and state (the retained history of executions).",
            labels=["task", "state"],
        )
        folders = list(self.settings.sync_folders)
        try:
            with self.engine.connect() as connection:
                lag_rows = connection.execute(
                    SYNC_LAG_SQL, {"folders": folders, "folder_count": len(folders)}
                ).all()
                outbox_rows = dict(
                    connection.execute(OUTBOX_SQL, {"states": list(OUTBOX_STATES)}).all()
                )
                attempt_rows = connection.execute(ATTEMPTS_SQL).all()
        except Exception as error:
            logger.warning("metrics: database not readable: %s", type(error).__name__)
            yield _source("database", False)
            return
        for account_id, seconds in lag_rows:
            lag.add_metric([account_id], max(0.0, float(seconds)))
        for status in OUTBOX_STATES:
            outbox.add_metric([status], int(outbox_rows.get(status, 0)))
        for task, state, count in attempt_rows:
            attempts.add_metric([task, state], int(count))
        yield from (lag, outbox, attempts)
        yield _source("database", True)


def _published_at(raw: bytes) -> float | None:
    message: Any = decode_json(raw)
    if not isinstance(message, dict):
        return None
    stamp = (message.get("headers") or {}).get(publish_time.HEADER)
    return float(stamp) if isinstance(stamp, int | float) else None


def registry_for(settings: Settings) -> tuple[CollectorRegistry, AppCollector]:
    registry = CollectorRegistry(auto_describe=False)
    collector = AppCollector(settings)
    registry.register(collector)
    return registry, collector


class _Server6(WSGIServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per scrape would flood the journal


def serve(settings: Settings, address: str, port: int) -> None:
    """Serve /metrics on address:port until interrupted (one scrape at a time)."""
    registry, collector = registry_for(settings)
    server_class = _Server6 if ":" in address else WSGIServer
    server = make_server(
        address,
        port,
        make_wsgi_app(registry),
        server_class=server_class,
        handler_class=_QuietHandler,
    )
    logger.info("metrics on http://%s:%d/metrics", address, port)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        collector.close()
