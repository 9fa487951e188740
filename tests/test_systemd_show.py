"""Reading `systemctl show` (roles/celery_units/filter_plugins/systemd_show.py): which of the
units asked for are enabled and active, so that celery_systemd and celery_health start only the
others."""

from __future__ import annotations

from tests.fixtures.source_files import load_file

systemd_show = load_file("systemd_show", "roles/celery_units/filter_plugins/systemd_show.py")

# Printed by systemd 252 (Debian 12) on a fleet host, for a running unit, one that does not
# exist, a running timer and the service that timer is starting.
SHOWN = """Id=celery-worker.service
ActiveState=active
UnitFileState=enabled

Id=celery-metrics.service
ActiveState=inactive
UnitFileState=

Id=celery-beat-health.timer
ActiveState=active
UnitFileState=enabled

Id=celery-beat-health.service
ActiveState=activating
UnitFileState=static
"""


def test_only_units_both_enabled_and_active_are_ready() -> None:
    ready = systemd_show.enabled_and_active(SHOWN)
    assert ready == ["celery-worker.service", "celery-beat-health.timer"]


def test_a_unit_enabled_but_stopped_or_running_but_disabled_is_not_ready() -> None:
    shown = (
        "Id=a.service\nActiveState=failed\nUnitFileState=enabled\n\n"
        "Id=b.service\nActiveState=active\nUnitFileState=disabled\n\n"
        "Id=c.service\nActiveState=active\nUnitFileState=enabled-runtime\n"
    )
    assert systemd_show.enabled_and_active(shown) == []


def test_nothing_shown_nothing_ready() -> None:
    assert systemd_show.enabled_and_active("") == []


def test_ansible_finds_the_filter_under_its_name() -> None:
    filters = systemd_show.FilterModule().filters()
    assert filters["systemd_enabled_and_active"] is systemd_show.enabled_and_active
