"""The fleet as deployed: both worker hosts consume, over the network, and the load generator's
counts hold with no fault (the reference for every fault below)."""

from __future__ import annotations

import pytest
from conftest import APP_HOSTS, DATA, Load, assert_exactly_once, host, workers_answer

pytestmark = pytest.mark.units("celery-worker.service", "celery-worker@io.service")


@pytest.mark.parametrize("name", APP_HOSTS)
def test_every_worker_host_answers_and_reaches_the_data_host(name):
    assert workers_answer(name)
    env = host(name).file("/etc/mailworker/mailworker.env").content_string
    address = host(DATA).interface("eth0").addresses[0]
    assert f"@{address}:" in env, "the broker and database URLs should name the data host"


def test_load_without_a_fault_ends_exactly_once():
    load = Load("baseline", rate=4, count=20, seconds=20)
    assert_exactly_once(load.counts(wait=60))
