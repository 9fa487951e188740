"""`mailworker metrics serve`: the app's own metrics follow real queued tasks, unacked messages,
outbox rows, task attempts, sync state and a real beat's tick (mailworker.metrics).

One endpoint process on an isolated broker database and the session's PostgreSQL; nothing is
faked. About 10 s: most of it is beat starting and ticking once.
"""

from __future__ import annotations

import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mailworker.settings import PrivateAddress, load_settings
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, text

from tests.fixtures.servers import MAILWORKER, Fleet, free_port, wait_until

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(exposition: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


@pytest.fixture
def endpoint(fleet: Fleet, tmp_path: Path) -> Iterator[Callable[[], str]]:
    port = free_port()
    log = (tmp_path / "metrics.log").open("wb")
    process = subprocess.Popen(
        [MAILWORKER, "metrics", "serve", "--port", str(port)],
        env=fleet.env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/metrics"

    def scrape() -> str:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read().decode()

    def answers() -> bool:
        assert process.poll() is None, (tmp_path / "metrics.log").read_text()
        try:
            scrape()
        except OSError:
            return False
        return True

    try:
        wait_until(answers, 20, "the metrics endpoint")
        yield scrape
    finally:
        process.terminate()
        process.wait(10)
        log.close()


def _insert_rows(db_engine: Engine, account: Any, task_name: str) -> None:
    """INBOX synced 100 s ago; one deferred and two unknown sends; two failed attempts and a
    succeeded one of `task_name`."""
    with db_engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO folder_sync_states (account_id, folder, tenant_id, uidvalidity,"
                " last_uid, synced_at) VALUES (:a, 'INBOX', :t, 1, 0, now() - interval '100 s')"
            ),
            {"a": account.account_id, "t": account.tenant_id},
        )
        for status in ("deferred", "unknown", "unknown"):
            connection.execute(
                text(
                    "INSERT INTO sent_messages (id, tenant_id, account_id, message_id, status,"
                    " recipients, subject, attempts, copied_to_sent)"
                    " VALUES (:id, :t, :a, :m, :s, '{}', '', 0, false)"
                ),
                {
                    "id": uuid.uuid4(),
                    "t": account.tenant_id,
                    "a": account.account_id,
                    "m": f"<{uuid.uuid4()}@metrics.test>",
                    "s": status,
                },
            )
        for state in ("failed", "failed", "succeeded"):
            connection.execute(
                text(
                    "INSERT INTO task_attempts (id, task_id, task_name, retries, redelivered,"
                    " hostname, state) VALUES (:id, :task_id, :name, 0, false, '', :state)"
                ),
                {
                    "id": uuid.uuid4(),
                    "task_id": uuid.uuid4().hex,
                    "name": task_name,
                    "state": state,
                },
            )


def test_the_endpoint_follows_queues_outbox_attempts_sync_and_beat(
    fleet: Fleet,
    endpoint: Callable[[], str],
    make_account: Callable[..., object],
    db_engine: Engine,
    tmp_path: Path,
) -> None:
    samples = parse(endpoint())
    assert value(samples, "mailworker_metrics_source_up", source="broker") == 1
    assert value(samples, "mailworker_metrics_source_up", source="database") == 1
    assert value(samples, "mailworker_queue_messages", queue="delete") == 0
    assert value(samples, "mailworker_queue_oldest_message_age_seconds", queue="delete") == 0
    assert value(samples, "mailworker_sync_interval_seconds") == 300

    # Three real tasks wait in `delete` (no worker consumes this broker database).
    client = fleet.client()
    for _ in range(3):
        client.send_task(
            "mailworker.tasks.delete.delete_messages", args=[str(uuid.uuid4()), []], queue="delete"
        )
    time.sleep(1.5)
    samples = parse(endpoint())
    assert value(samples, "mailworker_queue_messages", queue="delete") == 3
    age = value(samples, "mailworker_queue_oldest_message_age_seconds", queue="delete")
    assert age is not None
    assert 1.4 <= age < 30
    assert value(samples, "mailworker_queue_messages", queue="sync") == 0

    # A consumer takes one without acknowledging it: kombu moves it into the unacked hash.
    with client.connection_for_read() as connection:
        queue = connection.SimpleQueue("delete")
        message = queue.get(timeout=5)
        samples = parse(endpoint())
        assert value(samples, "mailworker_queue_messages", queue="delete") == 2
        assert value(samples, "mailworker_queue_unacked_messages", queue="delete") == 1
        message.ack()
        queue.close()
    samples = parse(endpoint())
    assert value(samples, "mailworker_queue_unacked_messages", queue="delete") == 0

    # Sync lag from the stalest folder, by account id; outbox rows; task attempts.
    account = make_account()
    task_name = f"tests.metrics.{uuid.uuid4().hex[:8]}"
    _insert_rows(db_engine, account, task_name)

    # Other tests write the outbox concurrently: compare with counts that held around a scrape.
    for _ in range(5):
        before = _outbox_counts(db_engine)
        exposition = endpoint()
        if _outbox_counts(db_engine) == before:
            break
    samples = parse(exposition)
    for status in ("deferred", "unknown"):
        assert value(samples, "mailworker_outbox_messages", status=status) == before[status]
    assert before["unknown"] >= 2
    lag = value(samples, "mailworker_account_sync_lag_seconds", account_id=account.account_id)
    assert lag is not None
    assert 100 <= lag < 160
    assert value(samples, "mailworker_task_attempts", task=task_name, state="failed") == 2
    assert value(samples, "mailworker_task_attempts", task=task_name, state="succeeded") == 1

    _assert_beat_ticks(fleet, endpoint, tmp_path)
    _assert_no_personal_data(fleet, endpoint(), account)


def _outbox_counts(db_engine: Engine) -> dict[str, int]:
    with db_engine.connect() as connection:
        rows = connection.execute(
            text("SELECT status, count(*) FROM sent_messages GROUP BY status")
        )
        return dict(rows.all())


def _assert_beat_ticks(fleet: Fleet, endpoint: Callable[[], str], tmp_path: Path) -> None:
    beat = fleet.start_beat(tmp_path)
    beat_name = beat.env["MAILWORKER_BEAT_NAME"].replace("%h", "")

    def tick() -> float | None:
        for (name, labels), stamp in parse(endpoint()).items():
            label = dict(labels)
            if name == "mailworker_beat_last_tick_timestamp_seconds" and label.get(
                "beat", ""
            ).startswith(beat_name):
                assert label["role"] == "leader"
                return stamp
        return None

    stamp = wait_until(tick, 30, "beat's tick in the metrics")
    assert time.time() - 30 < stamp <= time.time() + 1


def _assert_no_personal_data(fleet: Fleet, exposition: str, account: Any) -> None:
    """No label value and no line carries an address, a password, a key or a server URL."""
    settings = load_settings(fleet.env)
    secrets = [
        account.address,
        account.password,
        settings.broker_url,
        settings.database_url,
        *settings.encryption_keys,
    ]
    for secret in secrets:
        assert secret not in exposition
    for (_name, labels), _ in parse(exposition).items():
        for key, label in labels:
            assert "@" not in label or key == "beat", (key, label)


def test_an_unreachable_broker_is_a_zero_not_a_failed_scrape(fleet: Fleet) -> None:
    env = {**fleet.env, "MAILWORKER_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}
    completed = subprocess.run(
        [MAILWORKER, "metrics", "show"],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    samples = parse(completed.stdout)
    assert value(samples, "mailworker_metrics_source_up", source="broker") == 0
    assert value(samples, "mailworker_metrics_source_up", source="database") == 1
    assert value(samples, "mailworker_queue_messages", queue="sync") is None


@pytest.mark.parametrize("address", ["0.0.0.0", "8.8.8.8", "::", "example.org"])
def test_the_endpoint_refuses_a_public_address(address: str) -> None:
    with pytest.raises(ValueError, match="address"):
        PrivateAddress().parse(address)


@pytest.mark.parametrize("address", ["127.0.0.1", "10.0.3.7", "192.168.1.2", "::1"])
def test_the_endpoint_takes_loopback_and_private_addresses(address: str) -> None:
    assert PrivateAddress().parse(address) == address
