"""The fleet's Nomad task groups, from the unit model of every application host.

`nomad_job_groups(hostvars, hosts)` reads, for each host, the list of units roles/celery_units
built for it (`celery_units_list`) and what its units share (`nomad_jobs_host`: mailworker_app's
non-secret settings, the names of the secret settings its features add, whether the database
is reached with TLS, and the release directory), and returns one task group per unit name: the
unit, its full settings (the shared ones, then the unit's own, which win, as with the two env
files under systemd), those secret names, the database TLS flag, whether the task needs the
fleet's CA, the release directory, and the hosts that run it, whose number is the group's
count. A unit whose facts differ between hosts cannot be one task group: that is an error
naming the unit, the hosts of each variant and what differs.

Plain Python with no Ansible import, so that the tests can call it directly.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

# Task groups in the order Nomad shows them: the workers, beat, Flower, the metrics endpoint.
SERVICE_ORDER = ("worker", "beat", "flower", "metrics")
# Set (to the host's copy of the fleet's CA) when the units reach Redis over TLS.
CA_SETTING = "MAILWORKER_REDIS_CA_FILE"


class NomadJobError(ValueError):
    """Units that cannot become one Nomad job; the message names the unit and the hosts."""


def group_name(unit_name: str) -> str:
    """A unit's task group name, also a Nomad Variable path element (no '@')."""
    return unit_name.replace("@", "-")


def _text(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _shape(unit: Mapping[str, Any], shared: Mapping[str, Any]) -> dict[str, Any]:
    settings = {**{str(k): _text(v) for k, v in shared["settings"].items()}, **unit["settings"]}
    return {
        "unit": dict(unit),
        "settings": dict(sorted(settings.items())),
        "secret_settings": [str(name) for name in shared.get("secret_settings", [])],
        "database_tls": bool(shared.get("database_tls", False)),
        "release_home": str(shared["release_home"]),
    }


def nomad_job_groups(hostvars: Mapping[str, Any], hosts: Sequence[str]) -> list[dict[str, Any]]:
    """One task group per unit name that `hosts` run, with its count and hosts."""
    variants: dict[str, dict[str, list[str]]] = {}
    shapes: dict[str, dict[str, Any]] = {}
    order: dict[str, tuple[int, int]] = {}
    for host in sorted(hosts):
        shared = hostvars[host]["nomad_jobs_host"]
        for position, unit in enumerate(hostvars[host]["celery_units_list"]):
            shape = _shape(unit, shared)
            key = json.dumps(shape, sort_keys=True)
            variants.setdefault(unit["name"], {}).setdefault(key, []).append(host)
            shapes.setdefault(key, shape)
            order.setdefault(unit["name"], (SERVICE_ORDER.index(unit["service"]), position))
    groups = []
    for name in sorted(variants, key=order.__getitem__):
        if len(variants[name]) > 1:
            raise NomadJobError(_differences(name, variants[name], shapes))
        ((key, unit_hosts),) = variants[name].items()
        shape = shapes[key]
        needs_ca = shape["database_tls"] or CA_SETTING in shape["settings"]
        groups.append(
            {"name": group_name(name), **shape, "needs_ca": needs_ca, "hosts": unit_hosts}
        )
    names = [group["name"] for group in groups]
    clashes = sorted({name for name in names if names.count(name) > 1})
    if clashes:
        raise NomadJobError(f"task group names {', '.join(clashes)} are not unique")
    return groups


def _differences(
    name: str, variants: Mapping[str, list[str]], shapes: Mapping[str, Mapping[str, Any]]
) -> str:
    found = [shapes[key] for key in variants]
    flat = [
        {
            **shape["unit"],
            **shape["settings"],
            "secret_settings": shape["secret_settings"],
            "database_tls": shape["database_tls"],
            "release_home": shape["release_home"],
        }
        for shape in found
    ]
    differing = sorted(
        {field for item in flat for field in item}
        - {"settings"}
        - {field for field in flat[0] if _same(flat, field)}
    )
    hosts = " | ".join(", ".join(unit_hosts) for unit_hosts in variants.values())
    return (
        f"unit {name} differs between hosts ({hosts}) in {', '.join(differing)}: one Nomad task "
        "group runs the same unit on every client; give these hosts the same celery_units_* and "
        "mailworker_app_* values, or put them in inventories of their own"
    )


def _same(items: Sequence[Mapping[str, Any]], field: str) -> bool:
    return len({json.dumps(item.get(field), sort_keys=True) for item in items}) == 1


class FilterModule:
    """Ansible's entry point: `{{ hostvars | nomad_job_groups(ansible_play_hosts_all) }}`."""

    def filters(self) -> dict[str, Any]:
        return {"nomad_job_groups": _for_ansible}


def _for_ansible(hostvars: Mapping[str, Any], hosts: Sequence[str]) -> list[dict[str, Any]]:
    try:
        return nomad_job_groups(hostvars, hosts)
    except NomadJobError as error:
        from ansible.errors import AnsibleFilterError  # noqa: PLC0415 - only under Ansible

        raise AnsibleFilterError(str(error)) from None
