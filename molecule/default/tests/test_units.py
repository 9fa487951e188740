"""The worker and beat units: running, enabled, shaped for warm shutdown, hardened."""

from __future__ import annotations

import re

import pytest
from conftest import eventually

UNITS = ["celery-worker.service", "celery-worker@io.service", "celery-beat.service"]
MAX_EXPOSURE = 2.0
HARD_TIME_LIMIT = 300


def seconds(timespan: str) -> float:
    """systemd's formatted timespan ("5min 30s") in seconds."""
    factors = {"h": 3600, "min": 60, "s": 1, "ms": 0.001, "us": 0.000001}
    return sum(
        float(value) * factors[unit]
        for value, unit in re.findall(r"([\d.]+)(h|min|ms|us|s)", timespan)
    )


def props(host, unit: str) -> dict[str, str]:
    return host.service(unit).systemd_properties


@pytest.mark.parametrize("unit", UNITS)
def test_unit_is_active_and_enabled(host, unit, request):
    request.node.add_marker(pytest.mark.units(unit))
    service = host.service(unit)
    assert service.is_running
    assert service.is_enabled


@pytest.mark.parametrize("unit", UNITS)
def test_unit_runs_the_mailworker_cli_as_the_service_user(host, unit):
    p = props(host, unit)
    assert p["Type"] == "exec"
    assert p["User"] == "celeryworker"
    service = unit.split("@")[0].removesuffix(".service").removeprefix("celery-")
    command = "/opt/mailworker/venv/bin/mailworker"
    assert f"argv[]={command} run {service} ;" in p["ExecStart"]
    main_pid = p["MainPID"]
    assert host.run(f"ps -o user= -p {main_pid}").stdout.strip() == "celeryworker"


@pytest.mark.parametrize("unit", ["celery-worker.service", "celery-worker@io.service"])
def test_worker_stop_is_a_warm_shutdown_that_outlasts_the_hard_time_limit(host, unit):
    p = props(host, unit)
    assert p["KillMode"] == "mixed"
    assert p["KillSignal"] == "15"
    assert seconds(p["TimeoutStopUSec"]) > HARD_TIME_LIMIT


@pytest.mark.parametrize("unit", UNITS)
def test_unit_restarts_within_start_limits(host, unit):
    p = props(host, unit)
    assert p["Restart"] == "always"
    assert int(p["StartLimitBurst"]) > 0
    assert seconds(p["StartLimitIntervalUSec"]) > seconds(p["RestartUSec"]) * int(
        p["StartLimitBurst"]
    )


@pytest.mark.parametrize("unit", ["celery-worker.service", "celery-worker@io.service"])
def test_worker_memory_and_cpu_are_capped(host, unit):
    p = props(host, unit)
    assert int(p["MemoryMax"]) == 512 * 1024 * 1024
    assert p["CPUQuotaPerSecUSec"] == "2s"


@pytest.mark.units("celery-worker.service")
def test_prefork_worker_has_its_pool_processes(host):
    settings = host.file("/etc/mailworker/celery-worker.env").content_string
    concurrency = int(re.search(r'MAILWORKER_CONCURRENCY="(\d+)"', settings).group(1))

    def children() -> list[str]:
        main_pid = props(host, "celery-worker.service")["MainPID"]
        pids = host.run(f"pgrep -P {main_pid} -u celeryworker").stdout.split()
        return pids if len(pids) == concurrency else []

    assert len(eventually(children)) == concurrency


@pytest.mark.parametrize("unit", UNITS)
def test_unit_reaches_only_loopback_over_ip(host, unit):
    p = props(host, unit)
    # systemd lists the prefixes in no fixed order.
    assert set(p["IPAddressDeny"].split()) == {"0.0.0.0/0", "::/0"}
    # Broker and database run on this host in this scenario: nothing beyond loopback.
    assert set(p["IPAddressAllow"].split()) == {"127.0.0.0/8", "::1/128"}
    assert set(p["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}


@pytest.mark.parametrize("unit", UNITS)
def test_unit_is_sandboxed(host, unit):
    p = props(host, unit)
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "MemoryDenyWriteExecute": "yes",
        "ProtectProc": "invisible",
    }
    assert {key: p.get(key) for key in expected} == expected
    # An empty bounding set: no capability at all, even for a process that became root.
    bounding = host.run(f"systemctl show -p CapabilityBoundingSet --value {unit}").stdout.strip()
    assert bounding == ""


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_analyze_security_exposure_is_at_most_2(host, unit, request):
    request.node.add_marker(pytest.mark.units(unit))
    report = host.run(f"systemd-analyze security --no-pager {unit}")
    match = re.search(r"Overall exposure level for \S+: ([\d.]+)", report.stdout)
    assert match, report.stdout + report.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, report.stdout


@pytest.mark.units("celery-worker.service", "celery-worker@io.service")
def test_every_worker_answers_a_ping_through_the_broker(host):
    answered = lambda result: result.rc == 0  # noqa: E731
    main = eventually(
        lambda: host.run("mailworker health worker"), answered, timeout=120, interval=3
    )
    io = eventually(
        lambda: host.run(
            "MAILWORKER_ENV_FILES=/etc/mailworker/celery-worker@io.env mailworker health worker"
        ),
        answered,
        timeout=120,
        interval=3,
    )
    assert main.rc == 0, main.stdout + main.stderr
    assert io.rc == 0, io.stdout + io.stderr
    assert "celery-worker-io@" in io.stdout


@pytest.mark.units("celery-beat.service")
def test_beat_ticks_and_leads(host):
    # The only beat takes the free lease at start (a second host's beat would stand by).
    result = host.run("mailworker health beat")
    assert result.rc == 0, result.stdout + result.stderr
    assert " leads (lease " in result.stdout


def test_beat_keeps_no_state_on_the_host(host):
    # Its lease and the last run of each entry live in Redis, shared by every beat host.
    assert not host.file("/var/lib/mailworker/beat/celerybeat-schedule").exists
    assert "SCHEDULE" not in host.file("/etc/mailworker/celery-beat.env").content_string
