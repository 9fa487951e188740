"""Bad inventory values stop playbooks/site.yml before any host changes, naming the variable.

Runs the real playbook from the controller against this scenario's inventory with one bad value
at a time; the first play (playbooks/preflight.yml) must fail and nothing may change.
"""

from __future__ import annotations

import json
import sys

import pytest
from conftest import playbook


def site(*extra: str):
    return playbook("site.yml", *extra)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"celery_worker_concurrency": "abc"}, "celery_worker_concurrency"),
        (
            {"celery_worker_soft_time_limit": 300, "celery_worker_time_limit": 300},
            "celery_worker_soft_time_limit",
        ),
        ({"celery_worker_queues": ["sync", "mail"]}, "celery_worker_queues"),
        ({"mailworker_app_log_level": "LOUD"}, "mailworker_app_log_level"),
    ],
    ids=["concurrency-abc", "soft-not-below-hard", "unknown-queue", "bad-log-level"],
)
def test_bad_value_fails_before_any_change(overrides, named):
    result = site("-e", json.dumps(overrides))
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert named in output, output
    assert "changed=0" in output
    assert "PLAY [Redis, the broker]" not in output, "a play after the checks ran"


def test_two_beat_hosts_fail_before_any_change(tmp_path):
    ghost = tmp_path / "ghost-beat.yml"
    ghost.write_text(
        "celery_beat:\n  hosts:\n    ghost-beat:\n"
        "      ansible_connection: local\n"
        f"      ansible_python_interpreter: {sys.executable}\n"
    )
    result = site("-i", str(ghost))
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "exactly one beat may run" in output, output
    assert "changed=0" in output
    assert "PLAY [Redis, the broker]" not in output
