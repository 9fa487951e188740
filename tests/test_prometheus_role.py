"""roles/prometheus on the controller alone: where each exporter listens (loopback on the
monitoring host, the private address elsewhere, a public one refused), what the server scrapes
(from the unit model and those addresses), and that Debian's promtool accepts the configuration.
One ansible-playbook run on local connections, nothing installed; about 30 s."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
PLAYBOOK = REPO / "tests" / "data" / "prometheus" / "render.yml"
EXPORTER_PASSWORD = "exporter-password-for-the-render-test"

INVENTORY = {
    "all": {
        "vars": {
            "ansible_connection": "local",
            "ansible_python_interpreter": sys.executable,
        },
        "children": {
            # Host variables: they win over the lab's group_vars/all (which has a password too).
            "redis": {
                "hosts": {
                    "data-1": {
                        "prometheus_exporter_address": "10.0.0.2",
                        "prometheus_redis_exporter_password": EXPORTER_PASSWORD,
                    }
                }
            },
            "postgresql": {"hosts": {"data-1": None}},
            "celery_workers": {
                "hosts": {"app-1": None, "public-1": {"prometheus_exporter_address": "8.8.8.8"}}
            },
            "celery_beat": {"hosts": {"app-1": None}},
            "flower": {"hosts": {"app-1": None}},
            "monitoring": {"hosts": {"app-1": None}},
        },
    }
}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    base = tmp_path_factory.mktemp("prometheus-role")
    inventory = base / "inventory"
    inventory.mkdir()
    (inventory / "hosts.yml").write_text(yaml.safe_dump(INVENTORY))
    (inventory / "group_vars").mkdir()
    (inventory / "group_vars" / "all").symlink_to(
        REPO / "inventories" / "lab" / "group_vars" / "all"
    )
    out = base / "out"
    out.mkdir()
    completed = subprocess.run(
        [
            shutil.which("ansible-playbook") or "ansible-playbook",
            "-i",
            str(inventory),
            str(PLAYBOOK),
            "-e",
            f"repo={REPO} out={out}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=REPO,
        env={**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg")},
    )
    output = completed.stdout + completed.stderr
    # public-1 fails its address check (rc 2); every other host must get through.
    assert "failed=0" in _recap(output, "app-1"), output
    assert "failed=0" in _recap(output, "data-1"), output
    assert "failed=1" in _recap(output, "public-1"), output
    return out, output


def _recap(output: str, host: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith(host + " ")]
    assert lines, f"no recap line for {host}"
    return lines[-1]


def test_a_public_exporter_address_is_refused(rendered: tuple[Path, str]):
    _out, output = rendered
    assert "prometheus_exporter_address (8.8.8.8) on public-1" in output
    assert "must be loopback or a private IPv4 address" in output


def test_the_server_scrapes_loopback_and_private_targets(rendered: tuple[Path, str]):
    out, _output = rendered
    config = yaml.safe_load((out / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = {name: job["static_configs"][0]["targets"] for name, job in jobs.items()}
    assert targets == {
        "prometheus": ["127.0.0.1:9090"],
        "flower": ["127.0.0.1:5555"],
        "mailworker": ["127.0.0.1:9809"],
        "node": ["10.0.0.2:9100", "127.0.0.1:9100"],
        "redis": ["10.0.0.2:9121"],
        "postgresql": ["10.0.0.2:9187"],
    }
    assert jobs["flower"]["metrics_path"] == "/flower/metrics"
    assert jobs["flower"]["basic_auth"] == {
        "username": "flower-proxy",
        "password_file": "/etc/prometheus/flower.password",
    }
    assert jobs["prometheus"]["metrics_path"] == "/prometheus/metrics"
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    arguments = (out / "prometheus.default").read_text()
    assert "--web.listen-address=127.0.0.1:9090" in arguments
    assert "--web.route-prefix=/prometheus" in arguments


def test_promtool_accepts_the_rendered_configuration(rendered: tuple[Path, str]):
    out, _output = rendered
    promtool = shutil.which("promtool")
    assert promtool, (
        "promtool missing: `scripts/host-packages.sh test` installs Debian's prometheus"
    )
    completed = subprocess.run(
        [promtool, "check", "config", "--syntax-only", str(out / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_each_exporter_listens_on_its_hosts_address_only(rendered: tuple[Path, str]):
    out, _output = rendered
    assert sorted(p.name for p in (out / "app-1").iterdir()) == ["prometheus-node-exporter"]
    assert sorted(p.name for p in (out / "data-1").iterdir()) == [
        "prometheus-node-exporter",
        "prometheus-postgres-exporter",
        "prometheus-redis-exporter",
    ]
    node = (out / "app-1" / "prometheus-node-exporter").read_text()
    assert 'ARGS="--web.listen-address=127.0.0.1:9100"' in node
    redis = out / "data-1" / "prometheus-redis-exporter"
    assert 'ARGS="--web.listen-address=10.0.0.2:9121"' in redis.read_text()
    assert f'REDIS_PASSWORD="{EXPORTER_PASSWORD}"' in redis.read_text()
    # Its clients are on other hosts: Redis has TLS and no plaintext port, only the Unix socket.
    assert 'REDIS_ADDR="unix:///run/redis/redis-server.sock"' in redis.read_text()
    assert redis.stat().st_mode & 0o777 == 0o600
    postgres = (out / "data-1" / "prometheus-postgres-exporter").read_text()
    assert 'ARGS="--web.listen-address=10.0.0.2:9187"' in postgres
    assert "user=prometheus host=/var/run/postgresql" in postgres
    assert "password" not in postgres.lower()
