"""The inventory rule for beat: at least one host in celery_beat (several are fine, see
mailworker.beat), checked by playbooks/preflight.yml before any host changes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def preflight(tmp_path: Path, inventory: str) -> subprocess.CompletedProcess[str]:
    """playbooks/preflight.yml on an inventory of this machine only (it reads, never changes)."""
    hosts = tmp_path / "hosts.yml"
    hosts.write_text(inventory.format(python=sys.executable))
    return subprocess.run(
        [
            str(Path(sys.executable).parent / "ansible-playbook"),
            *("-i", str(hosts), str(REPO / "playbooks" / "preflight.yml")),
        ],
        env={**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg")},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_an_inventory_without_a_beat_host_stops_in_the_checks(tmp_path):
    ran = preflight(
        tmp_path,
        "celery_workers:\n  hosts:\n    ghost-worker:\n      ansible_connection: local\n"
        "      ansible_python_interpreter: {python}\n",
    )
    said = ran.stdout + ran.stderr
    assert ran.returncode != 0, said
    assert "celery_units: the inventory group celery_beat holds no host; at least one beat" in said
    assert "changed=0" in said
