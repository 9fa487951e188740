"""playbooks/nomad.yml: the fleet's Nomad job, read back and checked against the unit model.

No Nomad binary runs here (Nomad 1.7 and later are under the BSL and cannot be installed on the
test machines). For each inventory the playbook writes the job without contacting a host; the
job is parsed with python-hcl2 (the structure, blocks in order) and with pygohcl (HashiCorp's Go
HCL library, the parser Nomad itself uses, which also gives the template text exactly as Nomad
receives it), and every fact it must carry is compared with the unit model that
playbooks/units.yml writes for the same inventory, and every setting with the mailworker.env
that roles/mailworker_app writes for the same hosts (tests/data/nomad/mailworker_env.yml).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hcl2
import pygohcl
import pytest
import yaml
from hcl2.utils import SerializationOptions

from tests.fixtures.source_files import load_file

ROOT = Path(__file__).resolve().parents[1]
# lab: two hosts (TLS to Redis and PostgreSQL, no Sentinel, no monitoring user);
# production.example: Sentinel, the monitoring user and TLS, its vault from vault.yml.example;
# one-host: the lab's settings with every service on one host (plain, as Molecule's default).
INVENTORIES = ("lab", "production.example", "one-host")
ROLE = ROOT / "roles" / "nomad_jobs"
DEFAULTS = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
JOB = DEFAULTS["nomad_jobs_job_name"]
MIB = 1 << 20
# What the exec driver sets NOMAD_ALLOC_DIR and NOMAD_TASK_DIR to inside the task's chroot.
ALLOC_DIR = "/alloc"
TASK_DIR = "/local"
# The settings of mailworker.env that hold secrets: the job reads them from its Variable.
SECRET_SETTINGS = {
    "MAILWORKER_BROKER_URL",
    "MAILWORKER_DATABASE_URL",
    "MAILWORKER_ENCRYPTION_KEYS",
    "MAILWORKER_REDIS_SENTINEL_PASSWORD",
    "MAILWORKER_MONITOR_REDIS_PASSWORD",
}
# What Sentinel, the monitoring user and TLS add to mailworker.env (besides rediss://).
FEATURE_SETTINGS = {
    "MAILWORKER_REDIS_SENTINELS",
    "MAILWORKER_REDIS_MASTER_NAME",
    "MAILWORKER_REDIS_SENTINEL_PASSWORD",
    "MAILWORKER_MONITOR_REDIS_USER",
    "MAILWORKER_MONITOR_REDIS_PASSWORD",
    "MAILWORKER_REDIS_CA_FILE",
    "PGSSLMODE",
    "PGSSLROOTCERT",
}


def _filter_module() -> Any:
    return load_file("nomad_jobs_filter", "roles/nomad_jobs/filter_plugins/nomad_jobs.py")


@dataclass
class Rendered:
    inventory: str
    inventory_dir: Path
    files: dict[str, str]  # file name -> text, everything the playbook wrote
    job: dict[str, Any]  # python-hcl2: the job's body, blocks as lists
    go_job: dict[str, Any]  # pygohcl: the same job as Go's HCL evaluates it
    units: dict[str, list[dict[str, Any]]]  # host -> its units (playbooks/units.yml)
    env: dict[str, dict[str, str]]  # host -> its mailworker.env (roles/mailworker_app)
    ca_file: Path  # where roles/tls_ca keeps the fleet's CA on the controller

    def groups(self) -> dict[str, dict[str, Any]]:
        return {name: body for group in self.job["group"] for name, body in group.items()}

    def task(self, group: str) -> dict[str, Any]:
        ((_name, body),) = self.groups()[group]["task"][0].items()
        return body

    def templates(self, group: str) -> list[dict[str, Any]]:
        """The task's template blocks as Nomad receives them (pygohcl: strings unescaped)."""
        ((task,),) = [self.go_job["group"][group]["task"].values()]
        found = task["template"]
        return found if isinstance(found, list) else [found]

    def environment(self, group: str) -> tuple[dict[str, str], dict[str, str]]:
        """The task's env template: (plain settings, secret setting -> Variable path)."""
        (template,) = [found for found in self.templates(group) if found.get("env")]
        return _environment(template["data"])

    def units_by_name(self) -> dict[str, tuple[dict[str, Any], list[str]]]:
        found: dict[str, tuple[dict[str, Any], list[str]]] = {}
        for host, units in sorted(self.units.items()):
            for unit in units:
                found.setdefault(unit["name"], (unit, []))[1].append(host)
        return found


def _ansible_playbook() -> str:
    beside = Path(sys.executable).parent / "ansible-playbook"
    found = str(beside) if beside.is_file() else shutil.which("ansible-playbook")
    assert found, "ansible-playbook is not installed (make venv)"
    return found


def _one_host_inventory(directory: Path) -> Path:
    """The lab's settings and secrets with Redis, PostgreSQL and the units on one host."""
    directory.mkdir()
    groups = ("redis", "postgresql", "celery_workers", "celery_beat", "flower")
    hosts = {"all": {"children": {group: {"hosts": {"solo": None}} for group in groups}}}
    (directory / "hosts.yml").write_text(yaml.safe_dump(hosts))
    (directory / "group_vars").symlink_to(ROOT / "inventories" / "lab" / "group_vars")
    return directory


def _read_env_file(text: str) -> dict[str, str]:
    """KEY="value" lines as mailworker.env.j2 writes them (a backslash before \\, ", $, `)."""
    found = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, _, quoted = line.partition("=")
        assert re.fullmatch(r'".*"', quoted), line
        found[name] = re.sub(r"\\(.)", r"\1", quoted[1:-1])
    return found


@pytest.fixture(scope="module", params=INVENTORIES)
def rendered(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    inventory = request.param
    out = tmp_path_factory.mktemp(inventory.replace(".", "-"))
    if inventory == "one-host":
        inventory_dir = _one_host_inventory(out / inventory)
    else:
        inventory_dir = ROOT / "inventories" / inventory
    (out / "env").mkdir(mode=0o700)
    command = [
        _ansible_playbook(),
        "-i",
        str(inventory_dir),
        "playbooks/units.yml",
        "playbooks/nomad.yml",
        "tests/data/nomad/mailworker_env.yml",
        "-e",
        f"units_dir={out / 'units'}",
        "-e",
        f"nomad_jobs_output_dir={out / 'nomad'}",
        "-e",
        f"env_dir={out / 'env'}",
        # The CA the job carries is made here, not in the project's build/tls/.
        "-e",
        f"tls_ca_dir={out / 'tls'}",
        # As with a monitoring group: the metrics endpoint runs beside Flower.
        "-e",
        "celery_units_metrics_enabled=true",
    ]
    vault = inventory_dir / "group_vars" / "all" / "vault.yml.example"
    if vault.is_file():
        # A real inventory's vault: with it, the monitoring user is on (its password is set).
        command += ["-e", f"@{vault}"]
    env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1"}
    result = subprocess.run(  # noqa: PLW1510 - the return code is asserted with the output
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"
    files = {path.name: path.read_text() for path in sorted((out / "nomad").iterdir())}
    options = SerializationOptions(
        with_comments=False, explicit_blocks=False, strip_string_quotes=True
    )
    parsed = hcl2.loads(files[f"{JOB}.nomad.hcl"], serialization_options=options)
    ((job,),) = [list(entry.values()) for entry in parsed["job"]]
    units = {
        path.stem: json.loads(path.read_text()) for path in sorted((out / "units").glob("*.json"))
    }
    env = {
        path.stem: _read_env_file(path.read_text()) for path in sorted((out / "env").glob("*.env"))
    }
    return Rendered(
        inventory=inventory,
        inventory_dir=inventory_dir,
        files=files,
        job=job,
        go_job=pygohcl.loads(files[f"{JOB}.nomad.hcl"])["job"][JOB],
        units=units,
        env=env,
        ca_file=out / "tls" / "ca.crt",
    )


def _seconds(duration: str) -> int:
    match = re.fullmatch(r"([0-9]+)s", duration)
    assert match, f"{duration!r} is not a duration in seconds"
    return int(match.group(1))


def _environment(data: str) -> tuple[dict[str, str], dict[str, str]]:
    """The env template as the client would read it: (plain settings, secret setting -> path).

    Renders the little Go template there is (the allocation directory, `{{ "{{" }}`), then reads
    KEY="json" lines as go-envparse does; `KEY={{ .KEY.Value | toJSON }}` inside
    `{{ with nomadVar "PATH" }}` records that KEY comes from the variable PATH.
    """
    plain: dict[str, str] = {}
    secret: dict[str, str] = {}
    variable = None
    for line in data.splitlines():
        if not line.strip():
            continue
        if opened := re.fullmatch(r'\{\{ with nomadVar "([^"]+)" \}\}', line):
            variable = opened.group(1)
            continue
        if line == "{{ end }}":
            variable = None
            continue
        name, _, value = line.partition("=")
        if variable is not None:
            assert value == f"{{{{ .{name}.Value | toJSON }}}}", line
            secret[name] = variable
            continue
        value = value.replace('{{ env "NOMAD_ALLOC_DIR" }}', ALLOC_DIR)
        value = value.replace('{{ env "NOMAD_TASK_DIR" }}', TASK_DIR)
        value = value.replace('{{ "{{" }}', "{{")
        assert "{{" not in value, f"unexpected template action in {line!r}"
        plain[name] = json.loads(value)
    return plain, secret


# --- the job as a whole -------------------------------------------------------------------------


def test_every_file_parses_as_hcl_with_both_parsers(rendered: Rendered) -> None:
    assert set(rendered.files) == {f"{JOB}.nomad.hcl", "client.hcl"}
    for text in rendered.files.values():
        hcl2.loads(text)
        pygohcl.loads(text)  # raises HCLParseError with line and column
    assert rendered.job["type"] == "service"
    assert rendered.job["datacenters"] == DEFAULTS["nomad_jobs_datacenters"]


def test_one_group_per_unit_counted_by_the_hosts_that_run_it(rendered: Rendered) -> None:
    expected = {
        name.replace("@", "-"): (unit, hosts)
        for name, (unit, hosts) in rendered.units_by_name().items()
    }
    groups = rendered.groups()
    assert sorted(groups) == sorted(expected), "one task group per unit"
    services = [expected[name][0]["service"] for name in groups]
    order = ["worker", "beat", "flower", "metrics"]
    assert services == sorted(services, key=order.index), "workers first"
    for name, (unit, hosts) in expected.items():
        assert groups[name]["count"] == len(hosts), name
        assert groups[name]["meta"] == [{"unit": unit["name"]}]
        assert {"operator": "distinct_hosts", "value": "true"} in groups[name]["constraint"]
    if rendered.inventory == "production.example":
        # Three worker hosts, two of them beat, one Flower host (production.example/hosts.yml).
        assert groups["celery-worker"]["count"] == 3
        assert groups["celery-worker-io"]["count"] == 3
        assert groups["celery-beat"]["count"] == 2


def test_tasks_run_the_units_command_as_their_user_with_exec(rendered: Rendered) -> None:
    for name, (unit, _hosts) in rendered.units_by_name().items():
        task = rendered.task(name.replace("@", "-"))
        assert task["driver"] == "exec"
        assert task["user"] == unit["user"] == "celeryworker"
        ((config,),) = [task["config"]]
        assert [config["command"], *config["args"]] == unit["command"]
        assert unit["command"][1:] == ["run", unit["service"]]


def test_kill_timeout_is_the_units_stop_timeout_above_the_hard_time_limit(
    rendered: Rendered,
) -> None:
    for name, (unit, _hosts) in rendered.units_by_name().items():
        task = rendered.task(name.replace("@", "-"))
        assert task["kill_signal"] == "SIGTERM"
        kill_timeout = _seconds(task["kill_timeout"])
        assert kill_timeout == unit["stop_timeout_sec"], name
        if unit["service"] == "worker":
            assert kill_timeout > unit["worker"]["time_limit"], name


def test_the_release_is_mounted_read_only_from_a_host_volume(rendered: Rendered) -> None:
    volume_name = DEFAULTS["nomad_jobs_host_volume"]
    for name, (unit, _hosts) in rendered.units_by_name().items():
        group = rendered.groups()[name.replace("@", "-")]
        assert group["volume"] == [
            {volume_name: {"type": "host", "source": volume_name, "read_only": True}}
        ]
        ((mount,),) = [rendered.task(name.replace("@", "-"))["volume_mount"]]
        assert mount["volume"] == volume_name
        assert mount["read_only"] is True
        assert unit["command"][0].startswith(mount["destination"] + "/")


# --- settings and secrets -----------------------------------------------------------------------


def test_settings_are_the_units_own_and_secrets_come_from_nomad_variables(
    rendered: Rendered,
) -> None:
    for name, (unit, hosts) in rendered.units_by_name().items():
        group = name.replace("@", "-")
        (template,) = [found for found in rendered.task(group)["template"] if found.get("env")]
        assert template["destination"].startswith("secrets/")
        assert template["error_on_missing_key"] is True
        plain, secret = rendered.environment(group)
        for setting, value in unit["settings"].items():
            if setting == "MAILWORKER_LOG_FILE":
                assert plain[setting] == "", "Nomad keeps the task's logs: stderr"
            elif setting == "MAILWORKER_FLOWER_DB":
                assert plain[setting] == f"{ALLOC_DIR}/data/flower.db"
            else:
                assert plain[setting] == value, (group, setting)
        assert plain["MAILWORKER_LOG_LEVEL"] == "INFO"  # mailworker_app's, shared by every unit
        expected_secret = dict.fromkeys(
            SECRET_SETTINGS & set(rendered.env[hosts[0]]), f"nomad/jobs/{JOB}"
        )
        assert set(DEFAULTS["nomad_jobs_secret_settings"]) <= set(expected_secret)
        if unit["service"] == "flower":
            expected_secret["FLOWER_BASIC_AUTH"] = f"nomad/jobs/{JOB}/{group}"
        assert secret == expected_secret, group
        assert not set(plain) & set(secret)


def test_every_setting_of_mailworker_env_is_in_the_job_the_secrets_as_variable_items(
    rendered: Rendered,
) -> None:
    """Parity with systemd: what mailworker.env gives a unit, its task gets from the inventory."""
    for name, (unit, hosts) in rendered.units_by_name().items():
        group = name.replace("@", "-")
        plain, secret = rendered.environment(group)
        for host in hosts:
            env = rendered.env[host]
            for setting, value in env.items():
                if setting in unit["settings"]:
                    continue  # the unit's own file wins (checked above)
                if setting in SECRET_SETTINGS:
                    assert secret.get(setting) == f"nomad/jobs/{JOB}", (group, setting)
                elif setting == "MAILWORKER_REDIS_CA_FILE":
                    assert plain[setting] == f"{TASK_DIR}/ca.crt", "the allocation's copy"
                else:
                    assert plain.get(setting) == value, (group, setting)
            database_tls = "sslmode=verify-full" in env["MAILWORKER_DATABASE_URL"]
            # libpq's defaults for a URL without sslmode and sslrootcert (the Variable's).
            expected_pg = (
                {"PGSSLMODE": "verify-full", "PGSSLROOTCERT": f"{TASK_DIR}/ca.crt"}
                if database_tls
                else {}
            )
            assert {key: plain[key] for key in plain if key.startswith("PG")} == expected_pg
            extra = set(plain) - set(env) - set(unit["settings"]) - set(expected_pg)
            assert not extra, f"{group}: settings mailworker.env does not have: {sorted(extra)}"


def test_the_fleets_ca_is_delivered_into_each_task_that_verifies_a_server(
    rendered: Rendered,
) -> None:
    for name, (_unit, hosts) in rendered.units_by_name().items():
        group = name.replace("@", "-")
        env = rendered.env[hosts[0]]
        needs_ca = "MAILWORKER_REDIS_CA_FILE" in env or "sslmode=verify-full" in env.get(
            "MAILWORKER_DATABASE_URL", ""
        )
        plain, _secret = rendered.environment(group)
        files = [found for found in rendered.templates(group) if not found.get("env")]
        if not needs_ca:
            assert not files, group
            continue
        (ca,) = files
        # The same certificate roles/tls_ca gives the Redis and PostgreSQL servers.
        assert ca["data"] == rendered.ca_file.read_text(), group
        assert ca["data"].startswith("-----BEGIN CERTIFICATE-----\n")
        assert ca["perms"] == "644"
        # Written into the task directory, which the exec driver mounts at NOMAD_TASK_DIR.
        assert ca["destination"].startswith("local/")
        inside = f"{TASK_DIR}/{ca['destination'].removeprefix('local/')}"
        for setting in ("MAILWORKER_REDIS_CA_FILE", "PGSSLROOTCERT"):
            if setting in plain:
                assert plain[setting] == inside, (group, setting)


def test_sentinel_monitoring_user_and_tls_follow_the_inventory(rendered: Rendered) -> None:
    expected = {
        # Sentinel (three hosts), the monitoring user (its vault password) and TLS both ways.
        "production.example": FEATURE_SETTINGS,
        # Redis and PostgreSQL on another host: TLS; no Sentinel, no monitoring user.
        "lab": {"MAILWORKER_REDIS_CA_FILE", "PGSSLMODE", "PGSSLROOTCERT"},
        # Everything on one host: loopback, none of them.
        "one-host": set(),
    }[rendered.inventory]
    for group in rendered.groups():
        plain, secret = rendered.environment(group)
        assert FEATURE_SETTINGS & (set(plain) | set(secret)) == expected, group
        assert FEATURE_SETTINGS & set(secret) <= SECRET_SETTINGS
        assert bool(expected) == any(not found.get("env") for found in rendered.templates(group))
    if rendered.inventory == "production.example":
        plain, secret = rendered.environment("celery-worker")
        assert plain["MAILWORKER_REDIS_SENTINELS"] == (
            "10.0.10.11:26379,10.0.10.12:26379,10.0.10.31:26379"
        )
        assert plain["MAILWORKER_REDIS_MASTER_NAME"] == "mailworker"
        assert plain["MAILWORKER_MONITOR_REDIS_USER"] == "monitor"
        assert secret["MAILWORKER_MONITOR_REDIS_PASSWORD"] == f"nomad/jobs/{JOB}"


def test_a_vault_that_cannot_be_read_fails_the_run_instead_of_dropping_the_monitoring_user(
    tmp_path: Path,
) -> None:
    """production.example without its vault: whether the monitoring user is on is unknown."""
    command = [
        _ansible_playbook(),
        "-i",
        "inventories/production.example",
        "playbooks/nomad.yml",
        "-e",
        f"nomad_jobs_output_dir={tmp_path / 'nomad'}",
        "-e",
        f"tls_ca_dir={tmp_path / 'tls'}",
    ]
    env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1"}
    result = subprocess.run(  # noqa: PLW1510 - the return code is asserted with the output
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0, result.stdout
    assert "'vault_redis_monitor_password' is undefined" in result.stdout + result.stderr
    assert not (tmp_path / "nomad").exists(), "no job file written"


def _inventory_secrets(inventory_dir: Path) -> set[str]:
    """Every string of the inventory's secret files (the lab's fixed values, the vault example)."""
    found: set[str] = set()
    directory = inventory_dir / "group_vars" / "all"
    for path in directory.iterdir():
        if not re.search(r"secret|vault", path.name):
            continue

        def strings(value: Any) -> Iterator[str]:
            if isinstance(value, str):
                yield value
            elif isinstance(value, dict):
                for item in value.values():
                    yield from strings(item)
            elif isinstance(value, list):
                for item in value:
                    yield from strings(item)

        found |= {text for text in strings(yaml.safe_load(path.read_text())) if len(text) >= 8}
    return found


def test_no_secret_of_the_inventory_is_written(rendered: Rendered) -> None:
    secrets = _inventory_secrets(rendered.inventory_dir)
    assert secrets, f"no secret values found in inventories/{rendered.inventory}"
    for name, text in rendered.files.items():
        leaked = sorted(secret for secret in secrets if secret in text)
        assert not leaked, f"{name} holds inventory secrets: {leaked}"


# --- rolling updates, restarts, resources -------------------------------------------------------


def test_updates_roll_one_allocation_at_a_time_and_revert(rendered: Rendered) -> None:
    for name, (unit, _hosts) in rendered.units_by_name().items():
        group = rendered.groups()[name.replace("@", "-")]
        ((update,),) = [group["update"]]
        assert update["max_parallel"] == 1
        assert update["auto_revert"] is True
        assert update["health_check"] == "task_states"
        min_healthy = _seconds(update["min_healthy_time"])
        healthy = _seconds(update["healthy_deadline"])
        progress = _seconds(update["progress_deadline"])
        # Nomad's own rules (UpdateStrategy.Validate), and room for the old allocation's drain.
        assert min_healthy == DEFAULTS["nomad_jobs_min_healthy_time_sec"]
        assert 0 < min_healthy < healthy < progress
        assert progress >= unit["stop_timeout_sec"] + healthy
        ((migrate,),) = [group["migrate"]]
        assert migrate["max_parallel"] == 1


def test_restart_and_reschedule_follow_the_units_restart_rule(rendered: Rendered) -> None:
    for name, (unit, _hosts) in rendered.units_by_name().items():
        group = rendered.groups()[name.replace("@", "-")]
        ((restart,),) = [group["restart"]]
        assert restart["attempts"] == unit["start_limit_burst"]
        assert _seconds(restart["interval"]) == unit["start_limit_interval_sec"]
        assert _seconds(restart["delay"]) == unit["restart_sec"]
        assert restart["mode"] == "fail"
        # RestartPolicy.Validate: attempts x delay must fit in the interval.
        assert restart["attempts"] * _seconds(restart["delay"]) <= _seconds(restart["interval"])
        ((reschedule,),) = [group["reschedule"]]
        assert reschedule["unlimited"] is True
        assert _seconds(reschedule["delay"]) == unit["start_limit_interval_sec"]
        assert 5 <= _seconds(reschedule["delay"]) <= _seconds(reschedule["max_delay"])


def test_resources_are_the_units_memory_and_cpu_ceilings(rendered: Rendered) -> None:
    mhz = DEFAULTS["nomad_jobs_cpu_mhz_per_core"]
    for name, (unit, _hosts) in rendered.units_by_name().items():
        ((resources,),) = [rendered.task(name.replace("@", "-"))["resources"]]
        assert resources["memory"] == math.ceil(unit["memory_max_bytes"] / MIB), name
        assert resources["cpu"] == math.ceil(unit["cpu_percent"] * mhz / 100), name
    if rendered.inventory == "production.example":
        assert rendered.task("celery-worker")["resources"][0]["memory"] == 1024  # 1G


# --- beat and Flower ----------------------------------------------------------------------------


def test_one_beat_group_with_an_allocation_per_beat_host_stopped_on_a_partitioned_client(
    rendered: Rendered,
) -> None:
    # Beats elect their leader through a lease in Redis (mailworker.beat): one per beat host.
    beats = [name for name, body in rendered.groups().items() if "beat" in body["task"][0]]
    assert beats == ["celery-beat"]
    beat = rendered.groups()["celery-beat"]
    ((_unit, hosts),) = [
        value for value in rendered.units_by_name().values() if value[0]["service"] == "beat"
    ]
    assert beat["count"] == len(hosts)
    ((disconnect,),) = [beat["disconnect"]]
    stop_after = _seconds(disconnect["stop_on_client_after"])
    assert stop_after == DEFAULTS["nomad_jobs_beat_stop_on_client_after_sec"] > 0
    assert disconnect["replace"] is True
    # Nomad refuses lost_after together with stop_on_client_after (DisconnectStrategy.Validate).
    assert "lost_after" not in disconnect
    assert "ephemeral_disk" not in beat  # its state lives in Redis
    for name, body in rendered.groups().items():
        if name != "celery-beat":
            assert "disconnect" not in body, name


def test_flower_is_reserved_on_loopback_beside_the_proxy(rendered: Rendered) -> None:
    (flower,) = [
        unit for unit, _hosts in rendered.units_by_name().values() if unit["service"] == "flower"
    ]
    group = rendered.groups()["celery-flower"]
    ((network,),) = [group["network"]]
    assert network["mode"] == "host"
    port = network["port"][0]["http"]
    assert port["static"] == int(flower["settings"]["MAILWORKER_FLOWER_PORT"])
    assert port["host_network"] == DEFAULTS["nomad_jobs_flower_host_network"]
    assert {
        "attribute": "${meta." + DEFAULTS["nomad_jobs_flower_node_meta"] + "}",
        "value": "true",
    } in group["constraint"]


def test_the_metrics_endpoint_runs_beside_flower_and_the_proxy(rendered: Rendered) -> None:
    (metrics,) = [
        unit for unit, _hosts in rendered.units_by_name().values() if unit["service"] == "metrics"
    ]
    group = rendered.groups()["celery-metrics"]
    assert "network" not in group  # loopback: Prometheus scrapes it on the same host
    assert {
        "attribute": "${meta." + DEFAULTS["nomad_jobs_flower_node_meta"] + "}",
        "value": "true",
    } in group["constraint"]
    assert metrics["settings"]["MAILWORKER_METRICS_ADDRESS"] == "127.0.0.1"


# --- client settings ----------------------------------------------------------------------------


def test_client_settings_let_the_longest_kill_timeout_run_out(rendered: Rendered) -> None:
    options = SerializationOptions(
        with_comments=False, explicit_blocks=False, strip_string_quotes=True
    )
    ((client,),) = [
        hcl2.loads(rendered.files["client.hcl"], serialization_options=options)["client"]
    ]
    longest = max(unit["stop_timeout_sec"] for unit, _hosts in rendered.units_by_name().values())
    assert _seconds(client["max_kill_timeout"]) >= longest
    mounts = {rendered.task(name)["volume_mount"][0]["destination"] for name in rendered.groups()}
    assert client["host_volume"] == [
        {DEFAULTS["nomad_jobs_host_volume"]: {"path": mounts.pop(), "read_only": True}}
    ]
    assert not mounts
    assert client["host_network"] == [
        {DEFAULTS["nomad_jobs_flower_host_network"]: {"cidr": "127.0.0.1/32"}}
    ]


# --- the grouping itself ------------------------------------------------------------------------


def test_a_unit_that_differs_between_hosts_is_refused_naming_it_and_the_hosts() -> None:
    module = _filter_module()

    def worker(concurrency: str) -> dict[str, Any]:
        return {
            "name": "celery-worker@io",
            "service": "worker",
            "settings": {"MAILWORKER_CONCURRENCY": concurrency},
        }

    shared = {"settings": {"MAILWORKER_LOG_LEVEL": "INFO"}, "release_home": "/opt/mailworker"}
    hostvars = {
        host: {"celery_units_list": [worker(concurrency)], "nomad_jobs_host": shared}
        for host, concurrency in (("w1", "8"), ("w2", "8"), ("w3", "20"))
    }
    with pytest.raises(module.NomadJobError) as raised:
        module.nomad_job_groups(hostvars, ["w1", "w2", "w3"])
    message = str(raised.value)
    assert "celery-worker@io" in message
    assert "w1, w2 | w3" in message
    assert "MAILWORKER_CONCURRENCY" in message
    (group,) = module.nomad_job_groups(hostvars, ["w1", "w2"])
    assert (group["name"], group["hosts"]) == ("celery-worker-io", ["w1", "w2"])
