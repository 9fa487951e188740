"""A worker alive but no longer consuming, under load, at the shipped settings: -b's I/O worker
stops taking tasks (Celery's own remote control, `cancel_consumer`: its event loop, and so its
answer to pings, go on, as in celery #8030, #8384 and #10205) while an operator has stopped
-a's, so the load's sends and syncs wait in its queues. `mailworker health worker` finds it
unhealthy once tasks waited MAILWORKER_WORKER_STUCK_AFTER with a free slot, its health unit
restarts it after the threshold of failed checks, and the restarted worker runs every task: none
lost, none twice. (A broker outage restarts nothing: test_50.)"""

from __future__ import annotations

import time

import pytest
import yaml
from conftest import (
    ROOT,
    VENV_PYTHON,
    WORKER_A,
    WORKER_B,
    Load,
    assert_exactly_once,
    host,
    setting,
    unit_runs,
    wait_for,
    workers_answer,
)

pytestmark = [
    pytest.mark.units("celery-worker@io.service", "celery-worker-io-health.service"),
    pytest.mark.timeout(600),
]
STUCK = "celery-worker@io.service"
HEALTH = "celery-worker-io-health.service"
QUEUES = ("send", "sync")  # the I/O instance's (inventories/lab/group_vars/all/main.yml)
HEALTH_DEFAULTS = yaml.safe_load(
    (ROOT / "roles" / "celery_health" / "defaults" / "main.yml").read_text(encoding="utf-8")
)
# How often a worker records its progress (mailworker/progress.py INTERVAL).
PROGRESS_INTERVAL = 10
# The remote control, with the deployed settings (through the Sentinels, over TLS).
CANCEL = (
    "import os, pathlib, sys;"
    "from mailworker.ops.envfile import load_env_file;"
    "load_env_file(pathlib.Path('/etc/mailworker/mailworker.env'), os.environ, override=True);"
    "from mailworker.celery_app import app;"
    "replies = app.control.cancel_consumer(sys.argv[1], destination=[sys.argv[2]], reply=True,"
    " timeout=10);"
    "print(len(replies))"
)


def cancel_consumers(name: str) -> None:
    node = f"celery-worker-io@{name}"
    for queue in QUEUES:
        out = host(name).check_output(f'{VENV_PYTHON} -c "{CANCEL}" {queue} {node}')
        assert out.strip() == "1", f"{node} did not confirm cancelling its {queue} consumer: {out}"


def test_a_worker_that_stopped_consuming_is_restarted_and_loses_nothing():
    stuck_after = setting("WORKER_STUCK_AFTER")
    interval = HEALTH_DEFAULTS["celery_health_interval_sec"]
    threshold = HEALTH_DEFAULTS["celery_health_failure_threshold"]
    before = unit_runs(WORKER_B, STUCK)
    host(WORKER_A).run(f"systemctl stop {STUCK}")
    try:
        cancel_consumers(WORKER_B)
        assert workers_answer(WORKER_B), "the worker should still answer before tasks wait"
        load = Load("stuck-worker", rate=2, count=20, seconds=10)
        waiting_from = time.monotonic()
        # Starved for stuck_after from the first progress record that saw it, then `threshold`
        # failed checks `interval` apart (the first within one interval; on a saturated CPU as
        # many again may be deferred: roles/celery_health), then the restart.
        bound = stuck_after + 2 * PROGRESS_INTERVAL + (2 * threshold + 1) * interval + 30
        restarted = wait_for(lambda: unit_runs(WORKER_B, STUCK) != before, bound, 5)
        restarted_after = round(time.monotonic() - waiting_from, 1)
        counts = load.counts(wait=120)
    finally:
        host(WORKER_A).run(f"systemctl start {STUCK}")
    verdicts = host(WORKER_B).run(
        f"journalctl -u {HEALTH} --since '-{int(bound) + 300} s' -o cat --no-pager"
    )
    print(
        f"\nstuck worker: {WORKER_B}'s {STUCK} restarted by its health unit {restarted_after} s"
        f" after tasks began to wait (bound {bound} s: stuck after {stuck_after} s,"
        f" {threshold} failed checks {interval} s apart); its checks:\n{verdicts.stdout}",
        flush=True,
    )
    assert restarted, f"{STUCK} on {WORKER_B} was not restarted within {bound} s"
    assert "answers pings but takes no tasks" in verdicts.stdout, verdicts.stdout
    assert_exactly_once(counts)
    assert wait_for(lambda: workers_answer(WORKER_A) and workers_answer(WORKER_B), 60)
