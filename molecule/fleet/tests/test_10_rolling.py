"""Rolling deploy of a new release (playbooks/deploy.yml, one host at a time, warm shutdown) and
rolling restart (playbooks/ops/restart.yml) under load: no task lost, none done twice."""

from __future__ import annotations

import json
import random
import time

import pytest
from conftest import Load, assert_exactly_once, playbook

pytestmark = [
    pytest.mark.units("celery-worker.service", "celery-worker@io.service", "celery-beat.service"),
    # Above pytest.ini's 300 s: a playbook run on both hosts, then the count.
    pytest.mark.timeout(900),
]
SETTING = "MAILWORKER_SYNC_BATCH_SIZE"


def under_load(tag: str, *args: str) -> dict:
    # Bounded, and long enough to span both hosts' restarts (the playbook's last minutes).
    load = Load(tag, rate=0.5, count=200, seconds=400)
    time.sleep(3)  # the first tasks are queued before the first host restarts
    started = time.monotonic()
    try:
        done = playbook(*args)
    finally:
        load.stop()
    print(f"\n{tag}: playbook {round(time.monotonic() - started, 1)} s", flush=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr
    return load.counts(wait=120)


def test_a_rolling_deploy_under_load_loses_nothing():
    settings = {"mailworker_app_settings": {SETTING: str(random.randint(50, 99))}}
    assert_exactly_once(under_load("deploy", "deploy.yml", "-e", json.dumps(settings)))


def test_a_rolling_restart_under_load_loses_nothing():
    assert_exactly_once(under_load("restart", "ops/restart.yml"))
