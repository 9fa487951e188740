"""Redis Sentinel: the fleet follows a failover, and the monitoring ACL user's limits.

A master, a replica and three Sentinels on loopback (tests/fixtures/sentinel.py) with the redis
role's ACL users. The failover test keeps a worker busy under a steady submission, kills the
master with SIGKILL and counts, from rows in PostgreSQL, what was lost and what ran twice; beat
and `mailworker health` must carry on through the Sentinels.

The TLS variant runs the same group with the role's TLS lines (its templates rendered: no
plaintext port on any node, TLS between Sentinels, to the data nodes and for replication) and
checks that the application's clients verify the certificate and follow a failover.

Timings: the Sentinels declare the master down after 1 s (Debian ships 30 s: its failover
takes that much longer, nothing else changes); the app's settings are app_env's short ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
import redis
from celery import Celery
from celery.utils.nodenames import host_format
from flower.utils.broker import Broker
from mailworker.beat import LEASE_KEY
from mailworker.celery_config import build_config
from mailworker.metrics import AppCollector
from mailworker.redis_client import redis_from_url, sentinel_options
from mailworker.settings import Settings, load_settings
from sqlalchemy import Engine, text

from tests.fixtures.mailservers import make_certificates
from tests.fixtures.sentinel import MASTER_NAME, SentinelGroup
from tests.fixtures.servers import MAILWORKER, IncludingWorker, WorkerProcess, wait_until
from tests.sentinel_tasks import TABLE

pytestmark = pytest.mark.slow

RATE = 20  # tasks submitted per second
BEFORE, AFTER = 4.0, 8.0  # seconds of submission before the kill and after the new master
# How long before its death a master's acknowledged write may still be missing on its replica:
# on loopback the lag is well under this, even on two busy cores.
REPLICATION_WINDOW = 1.0
SHORT_BEAT = {
    "MAILWORKER_SYNC_INTERVAL": "4",
    "MAILWORKER_SEND_SWEEP_INTERVAL": "4",
    "MAILWORKER_CLEANUP_INTERVAL": "5",
    "MAILWORKER_BEAT_LEASE": "3",
    "MAILWORKER_BEAT_MAX_LOOP_INTERVAL": "1",
    "MAILWORKER_BEAT_HEARTBEAT_MAX_AGE": "5",
}


@pytest.fixture
def effects_table(db_engine: Engine) -> str:
    with db_engine.begin() as connection:
        connection.execute(
            text(f"CREATE TABLE IF NOT EXISTS {TABLE} (run text, number int, task_id text)")
        )
    return uuid.uuid4().hex


def client(env: dict[str, str], *, monitor: bool = False) -> Celery:
    app = Celery("mailworker-tests")
    app.conf.update(build_config(load_settings(env), monitor=monitor))
    return app


def start_worker(env: dict[str, str], directory: Path) -> IncludingWorker:
    node = f"sentinel-{uuid.uuid4().hex[:8]}@%h"
    log_file = directory / f"{node.partition('@')[0]}.log"
    worker = IncludingWorker(
        {**env, "MAILWORKER_NODE_NAME": node, "MAILWORKER_LOG_FILE": str(log_file)},
        log_file,
        node,
        include="tests.sentinel_tasks",
    )
    worker.start()
    return worker


def start_beat(env: dict[str, str], directory: Path) -> WorkerProcess:
    name = f"beat-{uuid.uuid4().hex[:8]}"
    log_file = directory / f"{name}.log"
    beat_env = {
        **env,
        **SHORT_BEAT,
        "MAILWORKER_BEAT_NAME": f"{name}@%h",
        "MAILWORKER_LOG_FILE": str(log_file),
    }
    beat = WorkerProcess(beat_env, log_file, f"{name}@%h", service="beat")
    beat.start(wait=False)
    return beat


def health(env: dict[str, str], *what: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [MAILWORKER, "health", *what],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class Submitter(threading.Thread):
    """Submits `record` tasks at RATE per second until stopped; remembers which publishes
    returned (acknowledged by a master) and which raised."""

    def __init__(self, env: dict[str, str], run: str) -> None:
        super().__init__(daemon=True)
        self.app = client(env)
        self.run_id = run
        self.accepted: list[int] = []
        self.accepted_at: dict[int, float] = {}  # monotonic time the publish returned
        self.refused: list[int] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        number = 0
        started = time.monotonic()
        while not self.stopping.is_set():
            try:
                # ignore_result, as the task declares: no result subscription, whose
                # unsubscribe (from AsyncResult.__del__, maybe in a later test) would retry a
                # stopped group for 20 s.
                self.app.send_task(
                    "tests.sentinel.record",
                    args=[self.run_id, number],
                    queue="send",
                    ignore_result=True,
                )
                self.accepted.append(number)
                self.accepted_at[number] = time.monotonic()
            except Exception:
                self.refused.append(number)
            number += 1
            time.sleep(max(0.0, started + number / RATE - time.monotonic()))


def runs(db_engine: Engine, run: str) -> Counter[int]:
    with db_engine.connect() as connection:
        rows = connection.execute(
            text(f"SELECT number FROM {TABLE} WHERE run = :run"), {"run": run}
        )
        return Counter(row.number for row in rows)


def kill_the_master(group: SentinelGroup, how: str, interval: float) -> tuple[float, float]:
    """SIGKILL the master and wait for the Sentinels to promote the replica: the kill's
    monotonic time and the seconds the promotion took."""
    group.master.kill()
    killed = time.monotonic()
    wait_until(
        lambda: group.master_port() == group.replica.port,
        30,
        f"the Sentinels to promote the replica{how}\n{group.logs}",
        interval=interval,
    )
    return killed, time.monotonic() - killed


def wait_for_runs(
    db_engine: Engine, run: str, accepted: list[int], settings: Settings
) -> tuple[Counter[int], list[int]]:
    """The runs of each task once every accepted one ran or the visibility timeout passed, and
    those that ran only after it.

    Every accepted task runs, but those the master acknowledged and died before replicating. A
    task the worker had reserved but not started when the connection broke comes back from its
    unacked entry after the visibility timeout: wait that long."""
    patience = settings.visibility_timeout + 2 * settings.broker_restore_interval + 5
    deadline = time.monotonic() + patience
    drained = time.monotonic() + 10
    late: set[int] = set()
    while time.monotonic() < deadline and not set(accepted) <= set(runs(db_engine, run)):
        if time.monotonic() > drained and not late:
            late = set(accepted) - set(runs(db_engine, run))
        time.sleep(0.5)
    done = runs(db_engine, run)
    return done, sorted(late & set(done))


def test_the_fleet_follows_a_sentinel_failover_under_load(
    sentinel_group: SentinelGroup,
    sentinel_env: dict[str, str],
    effects_table: str,
    db_engine: Engine,
    tmp_path: Path,
) -> None:
    group, env, run = sentinel_group, sentinel_env, effects_table
    worker = start_worker(env, tmp_path)
    beat = start_beat(env, tmp_path)
    beats = [beat]
    try:
        master = group.client(group.master)
        wait_until(lambda: master.get(LEASE_KEY), 20, f"beat to lead\n{beat.log}")
        # A node nobody answers for: unhealthy while the first master serves.
        silent = "celery-worker@nowhere.invalid"
        checked = health(env, "worker", "--node", silent)
        assert checked.returncode == 1, checked.stdout + checked.stderr
        submitter = Submitter(env, run)
        submitter.start()
        time.sleep(BEFORE)

        killed, promoted = kill_the_master(group, "", interval=0.1)
        time.sleep(AFTER)
        submitter.stopping.set()
        submitter.join(10)
        assert not submitter.is_alive(), "the submitter hangs in a publish"
        accepted, refused = submitter.accepted, submitter.refused
        done, redelivered = wait_for_runs(db_engine, run, accepted, load_settings(env))
        lost = sorted(set(accepted) - set(done))
        twice = sorted(number for number, count in done.items() if count > 1)
        before_kill = [round(killed - submitter.accepted_at[number], 3) for number in lost]
        print(
            f"\nfailover: replica promoted {promoted:.1f} s after SIGKILL of the master; "
            f"submitted {len(accepted) + len(refused)} at {RATE}/s, accepted {len(accepted)}, "
            f"publish refused {len(refused)}, ran {len(done)}, lost {len(lost)} (accepted "
            f"{before_kill} s before the kill), ran twice {len(twice)}, ran only after the "
            f"visibility timeout {len(redelivered)}"
        )
        # Asynchronous replication may lose what the master acknowledged just before it died,
        # and nothing else: no task accepted by the new master, none accepted a while before.
        # (A publish's reply may reach the submitting thread a little after the kill returned.)
        assert all(-0.5 <= gap <= REPLICATION_WINDOW for gap in before_kill), worker.log[-4000:]

        # Beat: if its lease was lost with the master, it exits and its process manager starts it
        # again; either way a beat leads on the new master and periodic tasks are sent again.
        if beat.process is not None and beat.process.poll() is not None:
            reason = [line for line in beat.log.splitlines() if "lease" in line.lower()][-1:]
            print(f"beat exited with {beat.process.returncode} ({reason}); restarted")
            beats.append(start_beat(env, tmp_path))
        new_master = group.client(group.replica)
        before = new_master.llen("periodic")
        wait_until(
            lambda: new_master.get(LEASE_KEY) and new_master.llen("periodic") > before,
            20,
            "beat to lead and send on the new master\n" + "\n".join(b.log[-3000:] for b in beats),
        )

        # Just after the failover a worker may still be reconnecting: silence is unknown (exit 3,
        # which the health units do not count), for the bound the settings give.
        checked = health(env, "worker", "--node", silent)
        assert checked.returncode == 3, checked.stdout + checked.stderr
        assert "after a Sentinel failover" in checked.stdout, checked.stdout
        # The health checks reach the worker and beat through the Sentinels, as the monitoring user.
        checked = health(env, "worker", "--node", worker.node)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        checked = health(beats[-1].env, "beat")
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert worker.process is not None
        assert worker.process.poll() is None, worker.log[-4000:]
    finally:
        worker.stop()
        for started in beats:
            started.stop()


def test_the_monitoring_user_sees_queues_events_and_pings_but_takes_nothing(
    sentinel_group: SentinelGroup, sentinel_env: dict[str, str], tmp_path: Path
) -> None:
    # One Sentinel group for both checks (starting one takes about 10 s).
    check_sentinel_settings_reach_every_client(sentinel_group, sentinel_env)
    env = sentinel_env
    settings = load_settings(env)
    # A task in a queue no worker here consumes, a running task's entry, a result.
    app_client = redis_from_url(settings.broker_url, settings)
    app_client.lpush("spam", b'{"body": "a payload"}')
    app_client.hset("unacked", "tag", b'{"body": "a running payload"}')
    redis_from_url(settings.result_backend, settings).set("celery-task-meta-x", b"a result")
    worker = start_worker(env, tmp_path)
    try:
        # `mailworker health worker` pings through the Sentinels as the monitoring user.
        checked = health(env, "worker", "--node", worker.node)
        assert checked.returncode == 0, checked.stdout + checked.stderr

        # Flower's broker page: its own Sentinel client, LLEN of every priority list.
        monitor = client(env, monitor=True)
        assert monitor.conf.broker_url.startswith("sentinel://monitor:")
        broker = Broker(
            monitor.connection().as_uri(include_password=True),
            broker_options=monitor.conf.broker_transport_options,
        )
        lengths = asyncio.run(broker.queues(["spam"]))
        assert lengths == [{"name": "spam", "messages": 1}]

        # Flower's event stream (pub/sub) and its inspect calls (pidbox).
        seen: list[str] = []
        with monitor.connection() as connection:
            receiver = monitor.events.Receiver(
                connection, handlers={"*": lambda event: seen.append(event["type"])}
            )
            # The count includes messages that are not events (a wakeup's), and a loaded
            # machine's worker may take a few of its 2 s heartbeats: capture until one arrives.
            deadline = time.monotonic() + 30
            while "worker-heartbeat" not in seen and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    receiver.capture(limit=1, timeout=5, wakeup=not seen)
        assert "worker-heartbeat" in seen, seen
        node = host_format(worker.node)
        queues = monitor.control.inspect(destination=[node], timeout=5).active_queues()
        assert [queue["name"] for queue in (queues or {}).get(node, [])] == ["send"], queues

        # `mailworker metrics serve` reads the queues through the Sentinels too.
        collector = AppCollector(settings)
        try:
            samples = {
                (sample.name, tuple(sample.labels.values())): sample.value
                for family in collector.collect()
                for sample in family.samples
            }
        finally:
            collector.close()
        assert samples[("mailworker_metrics_source_up", ("broker",))] == 1, samples
        assert samples[("mailworker_queue_messages", ("spam",))] == 1, samples

        # What the monitoring user may not do.
        mon = redis_from_url(settings.broker_url, settings, monitor=True)
        results = redis_from_url(settings.result_backend, settings, monitor=True)
        refused = {
            "DEL spam": lambda: mon.delete("spam"),
            "LRANGE spam": lambda: mon.lrange("spam", 0, -1),
            "RPOP spam": lambda: mon.rpop("spam"),
            "BRPOP spam": lambda: mon.brpop(["spam"], 1),
            "LMOVE spam": lambda: mon.lmove("spam", "celeryev.x"),
            "HGETALL unacked": lambda: mon.hgetall("unacked"),
            "GET a result": lambda: results.get("celery-task-meta-x"),
            "SADD a binding of send": lambda: mon.sadd("_kombu.binding.send", "x"),
            "FLUSHDB": mon.flushdb,
            "PUBLISH elsewhere": lambda: mon.publish("celery-task-meta-x", "x"),
            "LPUSH spam": lambda: mon.lpush("spam", "x"),
        }
        allowed = []
        for name, command in refused.items():
            try:
                command()
            except redis.exceptions.NoPermissionError:
                continue
            allowed.append(name)
        assert not allowed, f"the monitoring user may {allowed}"
        assert app_client.llen("spam") == 1
    finally:
        worker.stop()


def check_sentinel_settings_reach_every_client(
    sentinel_group: SentinelGroup, sentinel_env: dict[str, str]
) -> None:
    """The settings become kombu's sentinel:// URLs and options, and plain clients on the master."""
    settings = load_settings(sentinel_env)
    config = build_config(settings)
    password = sentinel_group.users.passwords["mailworker"]
    # The credentials on every address: after an error kombu moves on to the next one.
    assert config["broker_url"] == ";".join(
        f"sentinel://mailworker:{password}@127.0.0.1:{node.port}/0"
        for node in sentinel_group.sentinels
    )
    assert config["result_backend"] == config["broker_url"].replace("/0", "/1")
    for options in ("broker_transport_options", "result_backend_transport_options"):
        assert config[options]["master_name"] == MASTER_NAME
        assert config[options]["sentinel_kwargs"]["password"] == settings.redis_sentinel_password
    monitor = build_config(settings, monitor=True)
    assert monitor["broker_url"].startswith("sentinel://monitor:")
    # The plain clients (beat's lease, result cleanup) ask the same Sentinels for the master.
    client = redis_from_url(settings.broker_url, settings)
    assert client.connection_pool.get_master_address() == ("127.0.0.1", sentinel_group.master.port)


def test_the_app_follows_a_sentinel_failover_over_tls_with_verification(
    sentinel_tls_group: SentinelGroup,
    app_env: dict[str, str],
    effects_table: str,
    db_engine: Engine,
    tmp_path: Path,
) -> None:
    """About 25 s: the group, a worker, 2 s of tasks, the failover, 3 s of tasks, the checks
    (55 s when the worker dropped a reserved task on the connection loss: it comes back after
    the visibility timeout)."""
    group, run = sentinel_tls_group, effects_table
    env = {**app_env, **group.settings(), "MAILWORKER_QUEUES": "send"}
    settings = load_settings(env)
    assert settings.broker_url.startswith("rediss://")
    rendered = {node.port: node.config for node in group.sentinels}
    check_tls_only_and_verified(group, env, tmp_path)

    worker = start_worker(env, tmp_path)
    try:
        submitter = Submitter(env, run)
        submitter.start()
        time.sleep(2)
        # Polled every 0.5 s: each poll is three TLS handshakes in this process, which would
        # otherwise hold the submitting thread up and skew its timestamps.
        killed, promoted = kill_the_master(group, " over TLS", interval=0.5)
        time.sleep(3)
        submitter.stopping.set()
        submitter.join(10)
        assert not submitter.is_alive(), "the submitter hangs in a publish"
        done, _ = wait_for_runs(db_engine, run, submitter.accepted, settings)
        lost = sorted(set(submitter.accepted) - set(done))
        twice = sorted(number for number, count in done.items() if count > 1)
        after_kill = [round(submitter.accepted_at[number] - killed, 3) for number in lost]
        print(
            f"\nfailover over TLS: replica promoted {promoted:.1f} s after SIGKILL; accepted "
            f"{len(submitter.accepted)}, refused {len(submitter.refused)}, ran {len(done)}, "
            f"not run {len(lost)} (accepted {after_kill} s after the kill), ran twice "
            f"{len(twice)}; on the new master: {keys_and_sizes(group)}"
        )
        # A task whose publish returned while there was no master to accept it (between the kill
        # and the promotion: the dying master's reply) may be lost by replication. One accepted
        # before that interval or by the new master must run (one the worker had reserved and
        # dropped on the connection loss after the visibility timeout: wait_for_runs waits).
        assert all(-REPLICATION_WINDOW <= gap <= promoted for gap in after_kill), (
            f"{worker.log[-4000:]}\nkeys on the new master: {keys_and_sizes(group)}"
        )
        after = [n for n in submitter.accepted if submitter.accepted_at[n] > killed + promoted]
        assert after, "no task was accepted by the new master"
        check_clients_on_the_new_master(group, env, worker)
    finally:
        worker.stop()

    # Sentinel rewrote its file (at start and in the failover) and kept the role's TLS lines as
    # written: tasks/configure.yml's lineinfile finds them unchanged on the next run.
    for node in group.sentinels:
        tls_lines = [
            line for line in rendered[node.port].splitlines() if line.startswith(("tls-", "port "))
        ]
        current = (node.directory / "sentinel.conf").read_text().splitlines()
        assert "# Generated by CONFIG REWRITE" in current
        assert [line for line in tls_lines if line not in current] == []


def keys_and_sizes(group: SentinelGroup) -> dict[str, int]:
    """Where a lost task may still be: each list and hash of the new master and its length."""
    admin = group.client(group.replica)
    sizes = {}
    for key in admin.scan_iter(count=1000):
        kind = admin.type(key)
        if kind == b"list":
            sizes[key.decode()] = admin.llen(key)
        elif kind == b"hash":
            sizes[key.decode()] = admin.hlen(key)
    return sizes


def check_tls_only_and_verified(group: SentinelGroup, env: dict[str, str], tmp_path: Path) -> None:
    """No node answers in plaintext, and a client trusting another CA is refused."""
    for node in [group.master, group.replica, group.sentinels[0]]:
        with pytest.raises(redis.ConnectionError):
            redis.Redis(port=node.port, socket_timeout=2, retry=None).ping()
    directory = tmp_path / "stranger-ca"
    directory.mkdir()
    stranger = make_certificates(directory).ca_file
    # The app's options for the Sentinels (kombu's, Celery's and the plain clients' alike).
    sentinel = group.sentinels[0].port
    trusting = sentinel_options(load_settings(env), timeout=2)["sentinel_kwargs"]
    assert trusting["retry"] is None  # one attempt per Sentinel (test_sentinel_frozen_host)
    assert redis.Redis(port=sentinel, **trusting).ping()
    untrusting = load_settings({**env, "MAILWORKER_REDIS_CA_FILE": str(stranger)})
    kwargs = sentinel_options(untrusting, timeout=2)["sentinel_kwargs"]
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        redis.Redis(port=sentinel, **kwargs).ping()


def check_clients_on_the_new_master(
    group: SentinelGroup, env: dict[str, str], worker: IncludingWorker
) -> None:
    """After the failover, over TLS: the plain clients, the result backend, Flower, the CLI."""
    settings = load_settings(env)
    # The plain clients (beat's lease, progress, result cleanup) land on the new master.
    plain = redis_from_url(settings.broker_url, settings)
    assert plain.connection_pool.get_master_address() == ("127.0.0.1", group.replica.port)
    plain.set("mailworker:test:tls", "1")
    assert group.client(group.replica).get("mailworker:test:tls") == b"1"
    # The result backend (Celery's Sentinel backend with redis_backend_use_ssl).
    app = client(env)
    app.backend.store_result("tls-result", 42, "SUCCESS")
    assert app.backend.get_task_meta("tls-result")["result"] == 42
    # Flower's broker page as Flower builds it (broker_use_ssl), as the monitoring user.
    monitor = client(env, monitor=True)
    broker = Broker(
        monitor.connection().as_uri(include_password=True),
        broker_options=monitor.conf.broker_transport_options,
        broker_use_ssl=monitor.conf.broker_use_ssl,
    )
    assert asyncio.run(broker.queues(["send"])) == [{"name": "send", "messages": 0}]
    # The CLI's health check pings the worker through the Sentinels, as the monitoring user.
    checked = health(env, "worker", "--node", worker.node)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert worker.process is not None
    assert worker.process.poll() is None, worker.log[-4000:]
