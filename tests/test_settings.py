"""The settings table: parsing, cross-checks, masking, and the README generated from it."""

import os
import re
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from celery import Celery
from cryptography.fernet import Fernet
from mailworker.celery_config import beat_schedule, build_config
from mailworker.errors import ConfigurationError
from mailworker.settings import (
    PERIODIC_INTERVALS,
    SETTINGS,
    effective,
    load_settings,
    markdown_table,
)

ROOT = Path(__file__).resolve().parent.parent
KEY = Fernet.generate_key().decode()


def base_env(**overrides: str) -> dict[str, str]:
    env = {
        "MAILWORKER_BROKER_URL": "redis://:brokerpw@127.0.0.1:6379/0",
        "MAILWORKER_DATABASE_URL": "postgresql+psycopg2://mw:dbpw@127.0.0.1:5432/mw",
        "MAILWORKER_ENCRYPTION_KEYS": KEY,
    }
    env.update(overrides)
    return env


def test_defaults_follow_the_contract():
    s = load_settings(base_env())
    assert s.result_backend == "redis://:brokerpw@127.0.0.1:6379/1"
    assert (s.concurrency, s.time_limit, s.soft_time_limit) == (4, 1260, 1200)
    assert (s.imap_deadline, s.smtp_deadline) == (240, 900)
    assert (s.result_expires, s.prefetch_multiplier, s.log_level) == (3600, 1, "INFO")
    assert s.queues == ("sync", "send", "delete", "spam", "periodic")
    assert s.node_name == "celery-worker@%h"
    assert (s.beat_name, s.beat_lease, s.beat_max_loop_interval) == ("celery-beat@%h", 30, 5)
    assert (s.flower_address, s.flower_port, s.flower_url_prefix) == ("127.0.0.1", 5555, "flower")
    assert s.encryption_keys == (KEY,)
    assert s.migration_database_url == s.database_url  # no separate owner unless set


def test_every_contract_variable_is_declared():
    contract = [
        "BROKER_URL",
        "DATABASE_URL",
        "ENCRYPTION_KEYS",
        "RESULT_BACKEND",
        "RESULT_EXPIRES",
        "CONCURRENCY",
        "POOL",
        "QUEUES",
        "NODE_NAME",
        "TIME_LIMIT",
        "SOFT_TIME_LIMIT",
        "SOFT_SHUTDOWN_TIMEOUT",
        "PREFETCH_MULTIPLIER",
        "RETRY_BACKOFF_BASE",
        "RETRY_BACKOFF_MAX",
        "RETRY_JITTER",
        "MAX_RETRIES",
        "LOG_LEVEL",
        "LOG_FILE",
        "SYNC_BATCH_SIZE",
        "IMAP_TIMEOUT",
        "SMTP_TIMEOUT",
        "REDIS_TLS_VERIFY",
        "IMAP_TLS_VERIFY",
        "SMTP_TLS_VERIFY",
        "TASK_EVENTS",
        "BEAT_NAME",
        "BEAT_LEASE",
        "BEAT_MAX_LOOP_INTERVAL",
        "FLOWER_ADDRESS",
        "FLOWER_PORT",
        "FLOWER_URL_PREFIX",
        "FLOWER_PERSISTENT",
        "FLOWER_DB",
        "FLOWER_READ_ONLY",
    ]
    missing = [name for name in contract if f"MAILWORKER_{name}" not in SETTINGS]
    assert missing == []


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"MAILWORKER_CONCURRENCY": "four"}, r"^MAILWORKER_CONCURRENCY: expected a whole number"),
        ({"MAILWORKER_CONCURRENCY": "0"}, r"^MAILWORKER_CONCURRENCY: must be at least 1"),
        ({"MAILWORKER_SOFT_TIME_LIMIT": "1300"}, r"^MAILWORKER_SOFT_TIME_LIMIT \(1300\) must"),
        ({"MAILWORKER_BROKER_URL": ""}, r"^MAILWORKER_BROKER_URL is required"),
        ({"MAILWORKER_BROKER_URL": "amqp://h//"}, r"^MAILWORKER_BROKER_URL: expected redis://"),
        ({"MAILWORKER_ENCRYPTION_KEYS": "not-a-key"}, r"^MAILWORKER_ENCRYPTION_KEYS: key 1 of 1"),
        ({"MAILWORKER_ENCRYPTION_KEYS": f"{KEY},short"}, r"key 2 of 2 is not a Fernet key"),
        ({"MAILWORKER_QUEUES": "sync,mail"}, r"^MAILWORKER_QUEUES: unknown mail"),
        ({"MAILWORKER_POOL": "gevent"}, r"^MAILWORKER_POOL: expected one of prefork"),
        ({"MAILWORKER_TASK_EVENTS": "maybe"}, r"^MAILWORKER_TASK_EVENTS: expected true or false"),
        ({"MAILWORKER_DATABASE_URL": "sqlite:///x.db"}, r"^MAILWORKER_DATABASE_URL: expected post"),
        ({"MAILWORKER_VISIBILITY_TIMEOUT": "29"}, r"^MAILWORKER_VISIBILITY_TIMEOUT \(29\) must"),
        (
            {"MAILWORKER_VISIBILITY_TIMEOUT": "60", "MAILWORKER_BROKER_LEASE_INTERVAL": "21"},
            r"^MAILWORKER_VISIBILITY_TIMEOUT \(60\) must be at least 3 x .*LEASE_INTERVAL \(63\)",
        ),
        (
            {"MAILWORKER_POOL": "solo"},
            r"^MAILWORKER_VISIBILITY_TIMEOUT \(60\) must be above .* \(1260\) with .*=solo",
        ),
        (
            {"MAILWORKER_MIGRATION_DATABASE_URL": "mysql://o:pw@db/mw"},
            r"^MAILWORKER_MIGRATION_DATABASE_URL: expected postgresql",
        ),
        ({"MAILWORKER_FLOWER_PORT": "70000"}, r"^MAILWORKER_FLOWER_PORT: must be at most 65535"),
        (
            {"MAILWORKER_POOL": "threads", "MAILWORKER_MAX_MEMORY_PER_CHILD_KIB": "90000"},
            r"^MAILWORKER_MAX_MEMORY_PER_CHILD_KIB \(90000\) applies to the prefork pool only",
        ),
    ],
)
def test_bad_values_name_the_variable(overrides, expected):
    with pytest.raises(ConfigurationError) as raised:
        load_settings(base_env(**overrides))
    message = str(raised.value)
    assert re.search(expected, message), message
    assert "\n" not in message


def test_secrets_never_appear_in_errors_or_output():
    bad = base_env(MAILWORKER_BROKER_URL="redis://:brokerpw@host:notaport/0")
    with pytest.raises(ConfigurationError) as raised:
        load_settings(bad)
    assert "brokerpw" not in str(raised.value)

    owner = "postgresql+psycopg2://owner:ownerpw@127.0.0.1:5432/mw"
    env = base_env(MAILWORKER_MIGRATION_DATABASE_URL=owner)
    shown = "\n".join(f"{name}={value}" for name, value in effective(load_settings(env)))
    for secret in ("brokerpw", "dbpw", "ownerpw", KEY):
        assert secret not in shown
    assert "MAILWORKER_ENCRYPTION_KEYS=******** (1 key)" in shown


def test_readme_settings_table_is_generated():
    readme = (ROOT / "README.md").read_text()
    found = re.search(
        r"<!-- settings-table:start -->\n(.*?)<!-- settings-table:end -->", readme, re.S
    )
    assert found, "README.md lacks the settings-table markers"
    assert found.group(1) == markdown_table(), (
        "README settings table is stale: regenerate it with `mailworker config table`"
    )


def test_celery_config_routes_each_task_to_its_queue_and_is_explicit():
    conf = build_config(
        load_settings(
            base_env(
                MAILWORKER_TIME_LIMIT="120",
                MAILWORKER_SOFT_TIME_LIMIT="100",
                MAILWORKER_IMAP_DEADLINE="60",
                MAILWORKER_SMTP_DEADLINE="90",
                MAILWORKER_SMTP_FINAL_REPLY_TIMEOUT="60",
            )
        )
    )
    assert conf["task_acks_late"] is True
    assert conf["task_reject_on_worker_lost"] is True
    assert conf["broker_connection_max_retries"] is None
    assert conf["broker_connection_retry_on_startup"] is True
    assert conf["worker_cancel_long_running_tasks_on_connection_loss"] is False
    transport = conf["broker_transport_options"]
    # Leases, not task duration, keep a running task from being redelivered (redis_transport).
    assert transport["visibility_timeout"] >= 3 * transport["unacked_lease_interval"]
    assert conf["result_backend_transport_options"] == {
        "visibility_timeout": transport["visibility_timeout"]
    }
    assert [q.name for q in conf["task_queues"]] == ["sync", "send", "delete", "spam", "periodic"]
    assert set(conf["task_routes"].values()) == {"sync", "send", "delete", "spam", "periodic"}
    assert "broker_use_ssl" not in conf


def test_rediss_urls_verify_certificates():
    conf = build_config(load_settings(base_env(MAILWORKER_BROKER_URL="rediss://h:6380/0")))
    assert conf["broker_use_ssl"]["ssl_cert_reqs"] == ssl.CERT_REQUIRED
    assert conf["redis_backend_use_ssl"]["ssl_cert_reqs"] == ssl.CERT_REQUIRED
    off = build_config(
        load_settings(
            base_env(MAILWORKER_BROKER_URL="rediss://h:6380/0", MAILWORKER_REDIS_TLS_VERIFY="no")
        )
    )
    assert off["broker_use_ssl"]["ssl_cert_reqs"] == ssl.CERT_NONE


def test_each_task_is_routed_to_its_own_queue():
    app = Celery("routing")
    app.conf.update(build_config(load_settings(base_env())))
    expected = {
        "mailworker.tasks.sync.sync_mailbox": "sync",
        "mailworker.tasks.send.send_email": "send",
        "mailworker.tasks.delete.delete_messages": "delete",
        "mailworker.tasks.spam.classify_spam": "spam",
        "mailworker.tasks.periodic.sync_all_accounts": "periodic",
        "mailworker.tasks.periodic.cleanup_stale_tasks": "periodic",
        "mailworker.tasks.periodic.classify_unscored": "periodic",
    }
    routed = {name: app.amqp.router.route({}, name)["queue"].name for name in expected}
    assert routed == expected
    schedule = app.conf.beat_schedule
    assert {entry["options"]["queue"] for entry in schedule.values()} == {"periodic"}
    assert schedule["sync-all-accounts"]["schedule"].run_every.total_seconds() == 300
    assert schedule["cleanup-stale-tasks"]["schedule"].run_every.total_seconds() == 3600
    assert schedule["classify-unscored"]["schedule"].run_every.total_seconds() == 300


RETRY_WINDOWS = """
from mailworker.celery_app import app
from mailworker.settings import load_settings
from mailworker.tasks.base import MailTask

app.loader.import_default_modules()
settings = load_settings()
for task in app.tasks.values():
    if isinstance(task, MailTask):
        print(task.name, task.retry_window(settings))
"""


def test_every_task_retry_window_names_a_setting():
    # In a child process: finalizing the app here would configure it for the whole test session.
    done = subprocess.run(
        [sys.executable, "-c", RETRY_WINDOWS],
        env={**os.environ, **base_env()},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    windows = dict(line.split() for line in done.stdout.splitlines())
    assert "mailworker.tasks.sync.sync_mailbox" in windows
    assert len(windows) >= 6
    assert all(int(seconds) > 0 for seconds in windows.values()), windows


def test_mail_deadlines_end_before_the_soft_time_limit_of_the_queues_consumed():
    # A send worker needs the SMTP deadline (RFC 5321's 10 min final reply) below its soft limit.
    short = {"MAILWORKER_TIME_LIMIT": "300", "MAILWORKER_SOFT_TIME_LIMIT": "280"}
    with pytest.raises(ConfigurationError) as raised:
        load_settings(base_env(**short))
    assert str(raised.value) == (
        "MAILWORKER_SOFT_TIME_LIMIT (280) must be above MAILWORKER_SMTP_DEADLINE (900) on a "
        "worker consuming sync,send,delete,spam,periodic"
    )
    # The main prefork worker of the roles (no send) keeps short limits above the IMAP deadline.
    s = load_settings(base_env(**short, MAILWORKER_QUEUES="delete,spam,periodic"))
    assert s.soft_time_limit > s.imap_deadline
    with pytest.raises(ConfigurationError, match=r"above MAILWORKER_IMAP_DEADLINE \(240\)"):
        load_settings(
            base_env(**{**short, "MAILWORKER_SOFT_TIME_LIMIT": "200"}, MAILWORKER_QUEUES="delete")
        )


def test_the_beat_lease_lies_between_the_loop_and_the_shortest_periodic_interval():
    # Renewed once a loop: at least two loops, or a slow loop ends the leader.
    with pytest.raises(ConfigurationError) as raised:
        load_settings(base_env(MAILWORKER_BEAT_LEASE="9"))
    assert str(raised.value) == (
        "MAILWORKER_BEAT_LEASE (9) must be at least twice MAILWORKER_BEAT_MAX_LOOP_INTERVAL "
        "(5): the leader renews it once a loop"
    )
    # A failover waits out the lease: below every periodic interval (here the send sweep's).
    with pytest.raises(ConfigurationError) as raised:
        load_settings(base_env(MAILWORKER_BEAT_LEASE="60"))
    assert str(raised.value) == (
        "MAILWORKER_BEAT_LEASE (60) must be below MAILWORKER_SEND_SWEEP_INTERVAL (60), the "
        "shortest periodic interval: a beat failover delays periodic runs by up to the lease"
    )
    with pytest.raises(ConfigurationError, match=r"below MAILWORKER_SYNC_INTERVAL \(20\)"):
        load_settings(base_env(MAILWORKER_SYNC_INTERVAL="20"))
    assert load_settings(base_env(MAILWORKER_BEAT_LEASE="10")).beat_lease == 10


def test_the_lease_rule_knows_every_periodic_interval():
    """PERIODIC_INTERVALS (the lease's upper bound) names exactly the settings behind the beat
    schedule: a new periodic entry must join the rule."""
    changed = {f"MAILWORKER_{name}": str(1000 + i) for i, name in enumerate(PERIODIC_INTERVALS)}
    schedule = beat_schedule(load_settings(base_env(**changed)))
    seconds = sorted(entry["schedule"].run_every.total_seconds() for entry in schedule.values())
    assert seconds == sorted(float(value) for value in changed.values())
