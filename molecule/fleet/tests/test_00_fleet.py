"""The fleet as deployed: both worker hosts consume, over the network, every Redis client of a
host asks the three Sentinels for the master, and the load generator's counts hold with no fault
(the reference for every fault below)."""

from __future__ import annotations

import pytest
from conftest import (
    APP_HOSTS,
    DATA,
    ENV_FILE,
    SENTINEL_HOSTS,
    Load,
    address_of,
    assert_exactly_once,
    host,
    settings_of,
    workers_answer,
)

pytestmark = pytest.mark.units("celery-worker.service", "celery-worker@io.service")


@pytest.mark.parametrize("name", APP_HOSTS)
def test_every_worker_host_answers_and_reaches_the_data_host(name):
    assert workers_answer(name)
    env = host(name).file("/etc/mailworker/mailworker.env").content_string
    address = host(DATA).interface("eth0").addresses[0]
    assert f"@{address}:" in env, "the broker and database URLs should name the data host"


@pytest.mark.parametrize("name", APP_HOSTS)
def test_every_redis_client_of_the_host_asks_the_sentinels(name):
    """Workers, beat, Flower, the health checks and the CLI read mailworker.env (so do the load
    generator and the lease snippet here): with its Sentinel settings they ask the Sentinels."""
    settings = settings_of(name)
    sentinels = sorted(f"{address_of(sentinel)}:26379" for sentinel in SENTINEL_HOSTS)
    assert len(sentinels) == 3
    assert sorted(settings["MAILWORKER_REDIS_SENTINELS"].split(",")) == sentinels
    assert settings["MAILWORKER_REDIS_MASTER_NAME"] == "mailworker"
    # Secrets: only whether they are there, never their value in a failure message.
    has_password = bool(settings.get("MAILWORKER_REDIS_SENTINEL_PASSWORD"))
    assert has_password, "the Sentinels' password is not set"
    tls = settings["MAILWORKER_BROKER_URL"].startswith("rediss://")
    assert tls, "the broker URL is not rediss:// (TLS)"
    # Every unit that talks to Redis (not the restarts, not Flower's check of its own port) reads
    # the settings file and may reach every Sentinel and Redis host (IPAddressAllow=).
    units = (
        host(name)
        .check_output(
            "systemctl list-units --all --plain --no-legend --type=service 'celery-*' "
            "| awk '{print $1}' | grep -v -e '^celery-health-recover@' -e '^celery-flower-health'"
        )
        .split()
    )
    assert {"celery-worker.service", "celery-beat.service"} <= set(units), units
    redis_addresses = {address_of(redis_host) for redis_host in SENTINEL_HOSTS}
    for unit in units:
        files = host(name).check_output(f"systemctl show -p EnvironmentFiles --value {unit}")
        assert ENV_FILE in files, f"{unit} does not read {ENV_FILE}: {files}"
        allowed = host(name).check_output(f"systemctl show -p IPAddressAllow --value {unit}")
        prefixes = {prefix.split("/")[0] for prefix in allowed.split()}
        assert redis_addresses <= prefixes, f"{unit}: IPAddressAllow={allowed}"


def test_load_without_a_fault_ends_exactly_once():
    load = Load("baseline", rate=4, count=20, seconds=20)
    assert_exactly_once(load.counts(wait=60))
