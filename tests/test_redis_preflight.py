"""The redis role's preflight refuses a Sentinel group whose TLS cannot work, before any host
changes (playbooks/preflight.yml on hosts of this machine only; about 8 s)."""

from __future__ import annotations

from tests.test_beat_inventory import preflight

PASSWORD = "p" * 20
INVENTORY = f"""
all:
  vars:
    ansible_connection: local
    ansible_python_interpreter: {{python}}
    redis_app_password: {PASSWORD}
    redis_sentinel_password: {PASSWORD}
    redis_sentinel_auth_password: {PASSWORD}
    redis_replication_password: {PASSWORD}
    redis_tls: true
  children:
    redis:
      hosts:
        data-1:
          redis_private_address: 127.0.0.1
        data-2:
          redis_private_address: 127.0.0.2
          redis_tls_auth_clients: optional
    redis_sentinel:
      hosts:
        data-1:
        data-2:
        sentinel-3:
          redis_private_address: 127.0.0.3
          redis_tls: false
"""


def test_sentinel_with_tls_that_cannot_work_stops_in_the_checks(tmp_path):
    ran = preflight(tmp_path, INVENTORY)
    said = ran.stdout + ran.stderr
    assert ran.returncode != 0, said
    failed = {
        host: line
        for line in said.splitlines()
        if line.startswith("fatal: [")
        for host in ("data-1", "data-2", "sentinel-3")
        if f"[{host}]" in line
    }
    # data-1 is consistent; data-2 wants client certificates, sentinel-3 has no TLS.
    assert sorted(failed) == ["data-2", "sentinel-3"], said
    assert "assertion: not redis_tls | bool or redis_tls_auth_clients == 'no'" in said
    assert "assertion: redis_tls | bool == _redis_first_master_tls | bool" in said
    assert "changed=0" in said
    assert PASSWORD not in said
