"""Bad inventory values stop playbooks/site.yml before any host changes, naming the variable.

Runs the real playbook from the controller against this scenario's inventory with one bad value
at a time; the first play (playbooks/preflight.yml) must fail and nothing may change. The runs
only read the host, so they run side by side.
"""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import playbook, said

BAD_VALUES = {
    "concurrency-abc": (
        {"celery_units_worker_concurrency": "abc"},
        "celery_units_worker_concurrency",
    ),
    # The application's own rule, checked by `mailworker config check` on the controller against
    # the unit's full environment; the message names the inventory variable behind the setting.
    "soft-not-below-hard": (
        {"celery_units_worker_soft_time_limit": 300, "celery_units_worker_time_limit": 300},
        "MAILWORKER_SOFT_TIME_LIMIT is set by celery_units_worker_soft_time_limit",
    ),
    "instance-soft-below-deadlines": (
        {
            "celery_units_worker_instances": [
                {"name": "io", "queues": ["send"], "time_limit": 600, "soft_time_limit": 500}
            ]
        },
        "celery_units_worker_instances[io].soft_time_limit",
    ),
    "unknown-queue": (
        {"celery_units_worker_queues": ["sync", "mail"]},
        "celery_units_worker_queues",
    ),
    "bad-memory-size": (
        {"celery_units_worker_memory_max": "lots"},
        "celery_units_worker: memory_max: 'lots' is not a size",
    ),
    "unknown-process-manager": (
        {"celery_units_process_manager": "runit"},
        "celery_units_process_manager",
    ),
    "bad-log-level": ({"mailworker_app_log_level": "LOUD"}, "mailworker_app_log_level"),
    "old-variable-name": (
        {"celery_worker_concurrency": 2},
        "celery_worker_concurrency is no longer read: use celery_units_worker_concurrency",
    ),
    "old-recovery-grace": (
        {"celery_health_stop_grace_sec": 30},
        "celery_health_stop_grace_sec is no longer read",
    ),
}


# Two beat hosts are allowed now (one leads through a lease in Redis); the rule left, "at least
# one", cannot be broken while this scenario's host is in celery_beat: tests/test_beat_inventory.py
# checks it on an inventory of the controller alone.
@pytest.fixture(scope="module")
def runs() -> dict[str, subprocess.CompletedProcess[str]]:
    cases = {name: ("-e", json.dumps(overrides)) for name, (overrides, _) in BAD_VALUES.items()}
    with ThreadPoolExecutor(max_workers=len(cases)) as pool:
        futures = {name: pool.submit(playbook, "site.yml", *extra) for name, extra in cases.items()}
        return {name: future.result() for name, future in futures.items()}


def stopped_in_the_checks(result: subprocess.CompletedProcess[str], message: str) -> None:
    output = said(result)
    assert result.returncode != 0, output
    assert message in output, output
    assert "changed=0" in output
    assert "PLAY [Redis, the broker]" not in output, "a play after the checks ran"


@pytest.mark.parametrize("case", BAD_VALUES)
def test_bad_value_fails_before_any_change(runs, case):
    stopped_in_the_checks(runs[case], BAD_VALUES[case][1])
