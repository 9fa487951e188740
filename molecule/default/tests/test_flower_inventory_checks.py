"""Bad Flower, proxy and health-check values stop playbooks/site.yml before any host changes,
naming the variable (the same way as test_inventory_checks.py for the core roles).
"""

from __future__ import annotations

import json

import pytest
from conftest import playbook, said


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        # Flower is for the proxy's clients only: it must never listen beyond loopback.
        ({"celery_units_flower_address": "0.0.0.0"}, "celery_units_flower_address"),
        # Flower's own password: long, and no comma (Flower splits FLOWER_BASIC_AUTH at commas).
        ({"celery_flower_auth_password": "short,password"}, "celery_flower_auth_password"),
        # A certificate without its key would leave nginx unable to start.
        (
            {"flower_proxy_tls_certificate": "-----BEGIN CERTIFICATE-----"},
            "flower_proxy_tls_private_key",
        ),
        # A check that may take longer than its interval.
        ({"celery_health_worker_timeout": 45}, "celery_health_worker_timeout"),
    ],
    ids=[
        "flower-not-on-loopback",
        "flower-password-short-with-comma",
        "certificate-without-key",
        "check-longer-than-interval",
    ],
)
def test_bad_value_fails_before_any_change(overrides, named):
    result = playbook("site.yml", "-e", json.dumps(overrides))
    output = said(result)
    assert result.returncode != 0, output
    assert named in output, output
    assert "changed=0" in output
    assert "PLAY [Redis, the broker]" not in output, "a play after the checks ran"
