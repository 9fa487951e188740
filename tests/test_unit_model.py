"""The unit model (roles/celery_units): one list of units per host, built from the inventory.

The builder is plain Python (the Ansible filter plugin), so these tests call it directly with
the role's defaults, and run playbooks/units.yml to see that Ansible hands it the same inputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from bench.layout import model_of_defaults
from tests.fixtures.source_files import load_file

REPO = Path(__file__).resolve().parent.parent
ROLE = REPO / "roles" / "celery_units"
model = load_file("celery_units_model", "roles/celery_units/filter_plugins/celery_units.py")

ALL_GROUPS = ["celery_workers", "celery_beat", "flower"]
PATHS = {
    "venv": "/opt/mailworker/venv",
    "config_dir": "/etc/mailworker",
    "log_dir": "/var/log/mailworker",
    "user": "celeryworker",
    "group": "celeryworker",
}


def defaults() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    return data


def spec(
    groups: list[str] = ALL_GROUPS, *, monitoring: bool = False, **overrides: Any
) -> dict[str, Any]:
    """What roles/celery_units/vars/main.yml gives the filter, from the defaults + overrides;
    `monitoring`: the inventory has a monitoring group (celery_units_metrics_enabled's default)."""
    d = defaults() | {"celery_units_metrics_enabled": monitoring} | overrides
    return {
        "groups": groups,
        "paths": PATHS,
        "worker": {
            key: d[f"celery_units_worker_{key}"]
            for key in (
                "enabled",
                "queues",
                "pool",
                "concurrency",
                "time_limit",
                "soft_time_limit",
                "memory_max",
                "cpu_quota",
                "settings",
                "instances",
            )
        },
        "stop_grace_sec": d["celery_units_stop_grace_sec"],
        "beat": {k: d[f"celery_units_beat_{k}"] for k in ("memory_max", "cpu_quota", "settings")},
        "flower": {
            k: d[f"celery_units_flower_{k}"]
            for k in (
                "address",
                "port",
                "url_prefix",
                "persistent",
                "db",
                "read_only",
                "memory_max",
                "cpu_quota",
                "settings",
            )
        },
        "metrics": {
            k: d[f"celery_units_metrics_{k}"]
            for k in ("enabled", "address", "port", "memory_max", "cpu_quota", "settings")
        },
        "restart": {
            k: d[f"celery_units_{k}"]
            for k in ("restart_sec", "start_limit_burst", "start_limit_interval_sec")
        },
    }


def by_name(units: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {unit["name"]: unit for unit in units}


def test_the_defaults_run_a_prefork_worker_two_io_instances_beat_and_flower():
    units = by_name(model.celery_units(spec()))
    assert list(units) == [
        "celery-worker",
        "celery-worker@io-1",
        "celery-worker@io-2",
        "celery-beat",
        "celery-flower",
    ]
    assert units["celery-worker"]["settings"]["MAILWORKER_QUEUES"] == "delete,spam,periodic"
    io = units["celery-worker@io-1"]
    assert io["settings"]["MAILWORKER_POOL"] == "threads"
    assert io["settings"]["MAILWORKER_NODE_NAME"] == "celery-worker-io-1@%h"
    assert io["env_files"] == [
        "/etc/mailworker/mailworker.env",
        "/etc/mailworker/celery-worker@io-1.env",
    ]
    assert io["command"] == ["/opt/mailworker/venv/bin/mailworker", "run", "worker"]


def test_a_workers_stop_timeout_is_its_own_hard_limit_plus_the_grace():
    units = by_name(model.celery_units(spec(celery_units_stop_grace_sec=45)))
    assert units["celery-worker"]["stop_timeout_sec"] == 300 + 45
    assert units["celery-worker@io-1"]["stop_timeout_sec"] == 1260 + 45
    assert units["celery-beat"]["stop_timeout_sec"] == units["celery-flower"]["stop_timeout_sec"]


def test_one_restart_rule_for_every_unit():
    units = model.celery_units(spec(celery_units_restart_sec=7, celery_units_start_limit_burst=3))
    assert {(u["restart_sec"], u["start_limit_burst"]) for u in units} == {(7, 3)}


def test_the_hosts_groups_choose_its_units():
    assert [u["name"] for u in model.celery_units(spec(["celery_beat"]))] == ["celery-beat"]
    assert model.celery_units(spec(["redis"])) == []


def test_the_metrics_endpoint_runs_beside_flower_when_a_monitoring_group_exists():
    assert "{{ groups['monitoring']" in defaults()["celery_units_metrics_enabled"]
    assert "celery-metrics" not in by_name(model.celery_units(spec()))
    units = by_name(model.celery_units(spec(monitoring=True)))
    assert list(units)[-1] == "celery-metrics"
    metrics = units["celery-metrics"]
    assert metrics["command"] == ["/opt/mailworker/venv/bin/mailworker", "run", "metrics"]
    assert metrics["user"] == "celeryworker"
    assert metrics["settings"] == {
        "MAILWORKER_METRICS_ADDRESS": "127.0.0.1",
        "MAILWORKER_METRICS_PORT": "9809",
    }
    assert metrics["origins"]["MAILWORKER_METRICS_PORT"] == "celery_units_metrics_port"
    assert metrics["stop_timeout_sec"] == units["celery-flower"]["stop_timeout_sec"]
    # Only where Flower runs, and as Ansible hands the templated default over ("True").
    assert [u["name"] for u in model.celery_units(spec(["celery_beat"], monitoring=True))] == [
        "celery-beat"
    ]
    on = model.celery_units(spec(["flower"], celery_units_metrics_enabled="True"))
    assert [u["name"] for u in on] == ["celery-flower", "celery-metrics"]
    off = model.celery_units(spec(["flower"], celery_units_metrics_enabled="False"))
    assert [u["name"] for u in off] == ["celery-flower"]


def test_an_instance_follows_the_main_worker_where_it_sets_nothing():
    instances = [{"name": "bulk", "queues": ["sync"], "memory_max": "1G"}]
    unit = by_name(model.celery_units(spec(celery_units_worker_instances=instances)))[
        "celery-worker@bulk"
    ]
    assert unit["worker"]["pool"] == "prefork"
    assert unit["worker"]["time_limit"] == 300
    assert unit["memory_max_bytes"] == 1 << 30
    assert unit["origins"]["MAILWORKER_POOL"] == "celery_units_worker_pool"
    assert unit["origins"]["MAILWORKER_QUEUES"] == "celery_units_worker_instances[bulk].queues"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"celery_units_worker_memory_max": "lots"}, "memory_max: 'lots' is not a size"),
        ({"celery_units_beat_cpu_quota": "half"}, "celery_units_beat_cpu_quota"),
        (
            {"celery_units_worker_instances": [{"name": "a b", "queues": ["sync"]}]},
            "celery_units_worker_instances[0].name",
        ),
        (
            {"celery_units_worker_instances": [{"name": "x", "queues": []}]},
            "celery_units_worker_instances[x]: queues is empty",
        ),
        (
            {"celery_units_worker_instances": [{"name": "x", "queues": ["sync"]}] * 2},
            "celery-worker@x listed more than once",
        ),
        ({"celery_units_flower_db": "/srv/flower.db"}, "celery_units_flower_db"),
        (
            {"celery_units_metrics_enabled": True, "celery_units_metrics_memory_max": "lots"},
            "celery_units_metrics_memory_max",
        ),
    ],
)
def test_bad_values_name_their_variable(overrides, message):
    with pytest.raises(model.UnitModelError) as raised:
        model.celery_units(spec(**overrides))
    assert message in str(raised.value)


def test_ansible_builds_the_same_units_as_the_builder():
    """playbooks/units.yml on an inventory that sets nothing (what the bench starts) equals the
    builder called on the role's defaults: Ansible hands the builder the variables unchanged."""
    assert model_of_defaults() == model.celery_units(spec(["celery_workers"]))


def test_the_hardening_block_is_written_once():
    """Every systemd unit the roles install reads celery_systemd_hardening; none restates it."""
    templates = sorted((REPO / "roles").glob("*/templates/*.service.j2"))
    assert len(templates) >= 3
    for template in templates:
        text = template.read_text()
        assert "{{ celery_systemd_hardening }}" in text, template
        assert "ProtectSystem=" not in text, f"{template} restates the hardening block"
    block = yaml.safe_load((REPO / "roles/celery_systemd/vars/main.yml").read_text())
    assert "ProcSubset=pid" in block["celery_systemd_hardening"]
