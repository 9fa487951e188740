"""Prometheus on the deployed stack, as an operator checks it from the monitoring host.

Every target of its scrape configuration answers (`up == 1`) and each exporter can read its
server; the shipped alert rules are loaded and evaluate; its UI is behind the nginx proxy with
Flower's TLS and credentials; nothing new listens beyond loopback; the application's endpoint
serves the metrics docs/operations.md lists. Waits are bounded by a few scrape intervals. A
failing test prints the journals of Prometheus, its exporters and celery-metrics.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import testinfra.utils.ansible_runner
import yaml
from conftest import ROOT, eventually

testinfra_hosts = testinfra.utils.ansible_runner.AnsibleRunner(
    os.environ["MOLECULE_INVENTORY_FILE"]
).get_hosts("monitoring")

pytestmark = pytest.mark.units(
    "prometheus",
    "prometheus-node-exporter",
    "prometheus-redis-exporter",
    "prometheus-postgres-exporter",
    "celery-metrics",
)

API = "http://127.0.0.1:9090/prometheus/api/v1/"
CONFIG = "/etc/prometheus/prometheus.yml"
RULES_DIR = "/etc/prometheus/rules"
SHIPPED_RULES = ROOT / "roles" / "prometheus" / "files"
APP_METRICS = "http://127.0.0.1:9809/metrics"
HTTPS = "https://127.0.0.1"
CREDENTIALS = Path(os.environ["MOLECULE_INVENTORY_FILE"]).parent / ".credentials"
USER = "flower"
# What may listen beyond loopback on a host of this scenario, and the role that documents it:
# flower_proxy's TLS port and its redirect (Redis and PostgreSQL stay on loopback when every
# client is on the same host). Prometheus, its exporters and celery-metrics are not in it.
PUBLIC_LISTENERS = {("nginx", 443): "flower_proxy", ("nginx", 80): "flower_proxy"}
# The monitoring ports and the unit whose process listens on each.
MONITORING_PORTS = {
    9090: "prometheus.service",
    9100: "prometheus-node-exporter.service",
    9121: "prometheus-redis-exporter.service",
    9187: "prometheus-postgres-exporter.service",
    9809: "celery-metrics.service",
}


def curl(host, *args: str):
    return host.run("curl --silent --show-error --max-time 10 " + shlex.join(args))


def api(host, path: str, **params: str) -> Any:
    """The `data` of a Prometheus HTTP API answer, asked on loopback (as the proxy does)."""
    query = [
        arg for name, value in params.items() for arg in ("--data-urlencode", f"{name}={value}")
    ]
    result = curl(host, "--fail", "--get", *query, API + path)
    assert result.rc == 0, f"GET {API}{path}: {result.stderr}"
    body = json.loads(result.stdout)
    assert body["status"] == "success", body
    return body["data"]


def seconds(duration: str) -> float:
    factors = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    value, unit = re.fullmatch(r"(\d+)(ms|s|m|h)", duration).groups()
    return int(value) * factors[unit]


@pytest.fixture(scope="module")
def config(host) -> dict[str, Any]:
    return yaml.safe_load(host.file(CONFIG).content_string)


@pytest.fixture(scope="module")
def patience(config) -> float:
    """Three scrape (and rule evaluation) intervals and a scrape timeout: what a target that just
    started, or a server that just reloaded, needs before its first samples."""
    scrape = config["global"]
    return 3 * seconds(scrape["scrape_interval"]) + seconds(scrape["scrape_timeout"])


@pytest.fixture(scope="module")
def configured(config) -> set[tuple[str, str]]:
    """(job, instance) of every target the scrape configuration names."""
    return {
        (job["job_name"], target)
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }


@pytest.fixture(scope="module")
def password() -> str:
    return (CREDENTIALS / f"flower-proxy-{USER}.password").read_text().strip()


def test_prometheus_and_the_exporters_are_enabled_and_running(host):
    for unit in [*pytestmark.args]:
        service = host.service(unit)
        assert service.is_enabled, unit
        assert service.is_running, unit


def test_every_configured_target_is_scraped_and_up(host, configured, patience):
    # Flower, the app's endpoint, Prometheus itself and one exporter of each kind.
    assert {job for job, _ in configured} == {
        "prometheus",
        "flower",
        "mailworker",
        "node",
        "redis",
        "postgresql",
    }

    def up() -> dict[tuple[str, str], str]:
        samples = api(host, "query", query="up")["result"]
        return {(s["metric"]["job"], s["metric"]["instance"]): s["value"][1] for s in samples}

    found = eventually(up, until=lambda u: u == dict.fromkeys(configured, "1"), timeout=patience)
    targets = api(host, "targets", state="active")["activeTargets"]
    errors = {(t["labels"]["job"], t["scrapeUrl"]): t["lastError"] for t in targets}
    assert found == dict.fromkeys(configured, "1"), errors


@pytest.mark.parametrize("metric", ["redis_up", "pg_up"])
def test_each_server_exporter_logs_in_to_its_server(host, metric, patience):
    # A target's `up` says its exporter answered; these say it could read its server (the Redis
    # ACL user of roles/redis, PostgreSQL's peer login with pg_monitor's rights).
    def values() -> list[str]:
        return [s["value"][1] for s in api(host, "query", query=metric)["result"]]

    found = eventually(values, until=lambda v: v and set(v) == {"1"}, timeout=patience)
    assert found, f"no {metric} sample"
    assert set(found) == {"1"}, f"{metric}: {found}"


def test_each_rule_file_is_loaded_with_its_groups_and_evaluates(host, patience):
    installed = sorted(host.run(f"ls {RULES_DIR}").stdout.split())
    shipped = sorted(p.name for p in SHIPPED_RULES.glob("*.yml"))
    assert installed == shipped
    expected = {
        (f"{RULES_DIR}/{name}", group["name"]): [rule["alert"] for rule in group["rules"]]
        for name in shipped
        for group in yaml.safe_load((SHIPPED_RULES / name).read_text())["groups"]
    }

    def evaluated(groups: list[dict[str, Any]]) -> bool:
        return bool(groups) and all(r["health"] == "ok" for g in groups for r in g["rules"])

    groups = eventually(lambda: api(host, "rules")["groups"], until=evaluated, timeout=patience)
    loaded = {(g["file"], g["name"]): [r["name"] for r in g["rules"]] for g in groups}
    assert loaded == expected
    failing = [(r["name"], r["health"], r.get("lastError")) for g in groups for r in g["rules"]]
    assert all(health == "ok" for _, health, _ in failing), failing


@pytest.mark.parametrize(
    "path", ["/prometheus/", "/prometheus/classic/alerts", "/prometheus/api/v1/targets"]
)
def test_through_the_proxy_without_credentials_nginx_answers_401(host, path):
    result = curl(
        host, "--insecure", "--output", "/dev/null", "--write-out", "%{http_code}", HTTPS + path
    )
    assert result.stdout == "401", result.stderr


def test_through_the_proxy_a_wrong_password_gets_401(host):
    wrong = f"{USER}:not-the-password"
    result = curl(
        host,
        "--insecure",
        "--user",
        wrong,
        "--output",
        "/dev/null",
        "--write-out",
        "%{http_code}",
        HTTPS + "/prometheus/",
    )
    assert result.stdout == "401", result.stderr


# Debian's package ships Prometheus's classic UI (/prometheus/ redirects to its graph page).
@pytest.mark.parametrize(
    "path", ["/prometheus/", "/prometheus/classic/alerts", "/prometheus/classic/rules"]
)
def test_through_the_proxy_with_flowers_credentials_the_ui_answers(host, password, path):
    credentials = ("--user", f"{USER}:{password}")
    result = curl(host, "--insecure", "--fail", "--location", *credentials, HTTPS + path)
    assert result.rc == 0, result.stderr
    assert "<title>Prometheus Time Series" in result.stdout, result.stdout[:500]


def test_through_the_proxy_the_api_lists_the_alert_rules(host, password):
    url = HTTPS + "/prometheus/api/v1/rules"
    result = curl(host, "--insecure", "--fail", "--user", f"{USER}:{password}", url)
    assert result.rc == 0, result.stderr
    names = {r["name"] for g in json.loads(result.stdout)["data"]["groups"] for r in g["rules"]}
    assert {"MailworkerWorkerDown", "MailworkerBeatNotTicking", "DiskFilling"} <= names


def listeners(host) -> list[tuple[str, int, str, str]]:
    """(address, port, first process name, systemd unit) of every listening TCP socket. The unit
    comes from the socket's cgroup: root in this container (no CAP_SYS_PTRACE) cannot see which
    process of another user holds a socket (ss names only root's), but its cgroup, yes."""
    found = []
    output = host.check_output("ss --no-header --tcp --listening --numeric --processes --cgroup")
    for line in output.splitlines():
        fields = line.split()
        address, _, port = fields[3].rpartition(":")
        names = re.findall(r'\("([^"]+)",pid=\d+', line)
        cgroup = next((f.removeprefix("cgroup:") for f in fields if f.startswith("cgroup:")), "")
        unit = cgroup.rsplit("/", 1)[-1]
        found.append((address.strip("[]"), int(port), names[0] if names else "?", unit))
    return found


def loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%", maxsplit=1)[0]).is_loopback
    except ValueError:  # "*": every address
        return False


def test_nothing_listens_beyond_loopback_but_what_the_roles_document(host):
    public = {(name, port) for address, port, name, _ in listeners(host) if not loopback(address)}
    assert public <= set(PUBLIC_LISTENERS), host.check_output("ss -ltnp")


@pytest.mark.parametrize("port", sorted(MONITORING_PORTS))
def test_the_monitoring_ports_listen_on_loopback_only(host, port):
    found = [(address, unit) for address, p, _, unit in listeners(host) if p == port]
    assert found, f"nothing listens on port {port}\n" + host.check_output("ss -ltnp")
    assert all(loopback(address) for address, _ in found), found
    assert {unit for _, unit in found} == {MONITORING_PORTS[port]}, found


def documented_metrics() -> list[str]:
    """The application's metrics in docs/operations.md's table (section "Metrics and alerts")."""
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text.split("## Metrics and alerts", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `(mailworker_[a-z_]+)` \|", section, re.MULTILINE)


def test_the_app_endpoint_serves_the_documented_metrics(host):
    documented = documented_metrics()
    assert len(documented) >= 9, documented
    result = curl(host, "--fail", APP_METRICS)
    assert result.rc == 0, result.stderr
    served = set(re.findall(r"^# TYPE (\S+) ", result.stdout, re.MULTILINE))
    assert [name for name in documented if name not in served] == [], result.stdout
    # Both sources read, and a gauge per queue of the deployed settings.
    for source in ("broker", "database"):
        assert f'mailworker_metrics_source_up{{source="{source}"}} 1.0' in result.stdout
    queues = set(re.findall(r'^mailworker_queue_messages\{queue="([^"]+)"\}', result.stdout, re.M))
    assert {"sync", "send", "delete", "spam", "periodic"} <= queues, result.stdout


def test_prometheus_has_beats_recent_tick_from_the_app_endpoint(host, patience):
    # Beat writes its heartbeat every loop; the endpoint reads it from Redis at each scrape.
    query = 'time() - max(mailworker_beat_last_tick_timestamp_seconds{role="leader"})'

    def age() -> list[Any]:
        return api(host, "query", query=query)["result"]

    result = eventually(age, until=bool, timeout=patience)
    assert result, "no leader tick scraped"
    assert float(result[0]["value"][1]) < 120, result
