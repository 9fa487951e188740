"""The units that `systemctl show --property=Id,UnitFileState,ActiveState -- UNIT...` found
enabled and active.

roles/celery_systemd (its units) and roles/celery_health (its timers) read their units' state
with one `systemctl show` each and start only those not already running; this is the one place
that output is read. Shipped with the unit model (roles/celery_units), which both roles follow
and which the play loads before them. Plain Python with no Ansible import, like the model.
"""

from __future__ import annotations

from typing import Any


def enabled_and_active(output: str) -> list[str]:
    """The Id of every unit whose block (blocks are separated by an empty line) says
    UnitFileState=enabled and ActiveState=active, in the order shown."""
    ready = []
    for block in output.split("\n\n"):
        properties = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        enabled = properties.get("UnitFileState") == "enabled"
        if enabled and properties.get("ActiveState") == "active" and properties.get("Id"):
            ready.append(properties["Id"])
    return ready


class FilterModule:
    """Ansible's entry point: `{{ result.stdout | systemd_enabled_and_active }}`."""

    def filters(self) -> dict[str, Any]:
        return {"systemd_enabled_and_active": enabled_and_active}
