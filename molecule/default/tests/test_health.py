"""The health timers, as an operator checks them: they run, and they bring back a worker (and
Flower) that was killed or stopped responding, while an operator's stop is respected.

The tests start the check services directly instead of waiting for the 30 s timers. Every wait
is bounded; a failing test prints the journals of the units concerned (the `units` marker, see
conftest.py).
"""

import os
import time
from collections.abc import Callable

import pytest
import testinfra.utils.ansible_runner

_inventory = testinfra.utils.ansible_runner.AnsibleRunner(os.environ["MOLECULE_INVENTORY_FILE"])
testinfra_hosts = sorted(
    set(_inventory.get_hosts("celery_workers"))
    | set(_inventory.get_hosts("celery_beat"))
    | set(_inventory.get_hosts("flower"))
)

THRESHOLD = 3
RECOVER = "/usr/local/libexec/celery-health/celery-health-recover"
TIMERS = {
    "celery_workers": ["celery-worker-health.timer"],
    "celery_beat": ["celery-beat-health.timer"],
    "flower": ["celery-flower-health.timer"],
}
# The admin wrapper runs the CLI as celeryworker with the units' environment files.
WORKER_HEALTH = (
    "MAILWORKER_ENV_FILES=/etc/mailworker/celery-worker.env "
    "/usr/local/sbin/mailworker health worker"
)
# What each check asks, asked directly.
READY = {
    "celery_workers": WORKER_HEALTH,
    "celery_beat": "MAILWORKER_ENV_FILES=/etc/mailworker/celery-beat.env "
    "/usr/local/sbin/mailworker health beat",
    "flower": "curl --silent --fail --max-time 5 http://127.0.0.1:5555/flower/healthcheck",
}


def groups(host) -> list[str]:
    return host.ansible.get_variables()["group_names"]


def needs(host, group: str) -> None:
    if group not in groups(host):
        pytest.skip(f"{host.backend.get_hostname()} is not in {group}")


def journal(host, *units: str, lines: int = 80) -> str:
    args = " ".join(f"-u {unit}" for unit in units)
    return host.run(f"journalctl {args} -n {lines} --no-pager -o short-precise").stdout


def unit_property(host, unit: str, name: str) -> str:
    return host.check_output(f"systemctl show --property={name} --value {unit}")


def wait_for(condition: Callable[[], bool], timeout: float, step: float = 1.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()


def restarted(host, unit: str, old_pid: str) -> bool:
    return unit_property(host, unit, "ActiveState") == "active" and unit_property(
        host, unit, "MainPID"
    ) not in ("0", old_pid)


def worker_healthy(host) -> bool:
    return host.run(WORKER_HEALTH).rc == 0


def check_until_restarted(host, check: str, unit: str, old_pid: str, timeout: float) -> bool:
    """Run the check service (as the timer would) until `unit` has a new main process."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if restarted(host, unit, old_pid):
            return True
        host.run(f"systemctl start {check}")  # a failed check exits non-zero: expected
        wait_for(lambda: restarted(host, unit, old_pid), timeout=5)
    return restarted(host, unit, old_pid)


@pytest.mark.units(
    "celery-worker-health.timer", "celery-beat-health.timer", "celery-flower-health.timer"
)
@pytest.mark.parametrize(("group", "timer"), [(g, t) for g, ts in TIMERS.items() for t in ts])
def test_health_timers_are_enabled_and_active(host, group, timer):
    needs(host, group)
    assert host.service(timer).is_enabled
    assert unit_property(host, timer, "ActiveState") == "active"
    assert unit_property(host, timer, "AccuracyUSec") == "1s"


@pytest.mark.units("celery-worker-health", "celery-beat-health", "celery-flower-health")
@pytest.mark.parametrize(
    ("group", "check"),
    [
        ("celery_workers", "celery-worker-health.service"),
        ("celery_beat", "celery-beat-health.service"),
        ("flower", "celery-flower-health.service"),
    ],
)
def test_checks_pass_on_a_healthy_host(host, group, check):
    needs(host, group)
    target = check.replace("-health", "")
    # Earlier checklists restart units: wait until the target answers before checking the check.
    assert wait_for(lambda: host.run(READY[group]).rc == 0, timeout=60), READY[group]
    host.run(f"rm -f /var/lib/mailworker/health/{target}.failures")
    result = host.run(f"systemctl start {check}")
    assert result.rc == 0, result.stderr
    failures = host.file(f"/var/lib/mailworker/health/{target}.failures")
    assert not failures.exists


def test_checks_run_hardened_as_celeryworker(host):
    needs(host, "celery_workers")
    check = "celery-worker-health.service"
    assert unit_property(host, check, "User") == "celeryworker"
    assert unit_property(host, check, "NoNewPrivileges") == "yes"
    assert unit_property(host, check, "CapabilityBoundingSet") == ""
    assert set(unit_property(host, check, "IPAddressDeny").split()) == {"0.0.0.0/0", "::/0"}
    recover = "celery-health-recover@celery-worker.service"
    assert unit_property(host, recover, "CapabilityBoundingSet") == ""
    assert unit_property(host, recover, "RestrictAddressFamilies") == "AF_UNIX"


@pytest.mark.units("celery-worker", "celery-worker-health")
def test_a_killed_worker_is_back_and_healthy(host):
    needs(host, "celery_workers")
    unit = "celery-worker.service"
    old = unit_property(host, unit, "MainPID")
    host.run_expect([0], f"kill -KILL {old}")
    assert wait_for(lambda: restarted(host, unit, old), timeout=60)
    assert wait_for(lambda: worker_healthy(host), timeout=60)


@pytest.mark.units("celery-worker-health", "celery-health-recover@celery-worker", "celery-worker")
def test_a_worker_that_stopped_responding_is_restarted(host):
    needs(host, "celery_workers")
    unit, check = "celery-worker.service", "celery-worker-health.service"
    recover = "celery-health-recover@celery-worker.service"
    assert wait_for(lambda: worker_healthy(host), timeout=60)
    old = unit_property(host, unit, "MainPID")
    host.run_expect([0], f"kill -STOP {old}")
    try:
        # THRESHOLD failed checks of about 6 s each, then the warm restart.
        back = check_until_restarted(host, check, unit, old, timeout=150)
        assert back
    finally:
        host.run(f"kill -CONT {old}")  # only matters when the restart did not happen
    log = journal(host, check, recover, lines=80)
    assert f"failed {THRESHOLD} health checks in a row" in log, log
    assert f"restarting {unit} after failed health checks" in log, log
    assert wait_for(lambda: not host.file(f"/proc/{old}").exists, timeout=30), log
    assert wait_for(lambda: worker_healthy(host), timeout=60)


@pytest.mark.units("celery-worker-health", "celery-worker", "redis-server")
def test_a_broker_outage_restarts_no_worker(host):
    # The check cannot tell a hung worker from a missing broker: it answers unknown, which is
    # logged and not counted. Restarting the workers would not bring Redis back.
    needs(host, "celery_workers")
    if "redis" not in groups(host):
        pytest.skip("Redis runs on another host")
    unit, check = "celery-worker.service", "celery-worker-health.service"
    assert wait_for(lambda: worker_healthy(host), timeout=60)
    old = unit_property(host, unit, "MainPID")
    host.run("rm -f /var/lib/mailworker/health/celery-worker.service.failures")
    host.run_expect([0], "systemctl stop redis-server.service")
    try:
        for _ in range(THRESHOLD + 1):
            result = host.run(f"systemctl start {check}")
            assert result.rc == 0, result.stderr + journal(host, check)
    finally:
        host.run_expect([0], "systemctl start redis-server.service")
    log = journal(host, check, lines=20)
    assert f"cannot check {unit}, not counted" in log, log
    assert unit_property(host, unit, "MainPID") == old, log
    assert wait_for(lambda: worker_healthy(host), timeout=90), journal(host, unit)


def test_a_check_that_cannot_finish_in_time_is_deferred_then_counted(host):
    # Only a host too busy to run Python gets past the check's own limit (every wait inside it is
    # shorter): the first such check is not counted (threshold 1), the next one is, so a hung unit
    # on a host that stays overloaded is still restarted. `sleep` stands in for that check; one
    # that printed its `ok:` verdict before the limit was only slow to exit, and is a success.
    needs(host, "celery_workers")
    state = host.run_expect([0], "mktemp -d").stdout.strip()
    check = f"STATE_DIRECTORY={state} /usr/local/libexec/celery-health/celery-health-check"
    try:
        deferred = host.run(f"{check} celery-test.service 1 1 sleep 10")
        assert deferred.rc == 0, deferred.stdout + deferred.stderr
        assert "cannot check celery-test.service, not counted (1 of 1 deferrals)" in (
            deferred.stdout
        ), deferred.stdout
        assert "did not finish within 1 s" in deferred.stdout, deferred.stdout
        slow_exit = host.run(f"{check} celery-test.service 1 1 sh -c 'echo ok: answered; sleep 10'")
        assert slow_exit.rc == 0, slow_exit.stdout + slow_exit.stderr
        assert "not counted" not in slow_exit.stdout, slow_exit.stdout
        # The success ended the deferrals: one more timed-out check is deferred again, the next
        # is counted and, at the threshold of 1, hands the unit over.
        host.run_expect([0], f"{check} celery-test.service 1 1 sleep 10")
        counted = host.run(f"{check} celery-test.service 1 1 sleep 10")
        assert counted.rc == 1, counted.stdout + counted.stderr
        assert "handing it over for a restart" in counted.stdout, counted.stdout
    finally:
        host.run(f"rm -rf {state}")


def test_a_failure_on_a_saturated_cpu_is_counted_only_after_threshold_such_failures(host):
    # At the shipped limit: six busy loops on the host's CPUs for 4 s, then the check fails. At a
    # threshold of 2 the first two such failures are not counted; the next two are, and the second
    # hands the unit over: a hung unit on a host that stays busy is restarted after 2 x threshold
    # checks (the deferrals are not granted again once they ran out).
    needs(host, "celery_workers")
    state = host.run_expect([0], "mktemp -d").stdout.strip()
    starving = (
        'sh -c \'for i in 1 2 3 4 5 6; do timeout 4 sh -c "while :; do :; done" & done; '
        "wait; exit 1'"
    )
    check = (
        f"STATE_DIRECTORY={state} /usr/local/libexec/celery-health/celery-health-check "
        f"celery-test.service 2 20 {starving}"
    )
    try:
        for held in (1, 2):
            result = host.run(check)
            assert result.rc == 0, result.stdout + result.stderr
            assert f"not counted ({held} of 2 deferrals): the host's CPU is saturated" in (
                result.stdout
            ), result.stdout
        counted = host.run(check)
        assert counted.rc == 0, counted.stdout + counted.stderr
        assert "failed a health check (1 of 2 in a row before a restart)" in counted.stdout, (
            counted.stdout
        )
        handed_over = host.run(check)
        assert handed_over.rc == 1, handed_over.stdout + handed_over.stderr
        assert "handing it over for a restart" in handed_over.stdout, handed_over.stdout
    finally:
        host.run(f"rm -rf {state}")


@pytest.mark.units("celery-health-test-hung")
def test_the_restart_kills_a_main_process_that_ignores_sigterm(host):
    # A hung main process never finishes a warm shutdown; the restart's stop SIGKILLs it after the
    # unit's own TimeoutStopSec. A throwaway unit whose shell ignores SIGTERM stands in for it.
    needs(host, "celery_workers")
    unit = "celery-health-test-hung.service"
    host.run_expect(
        [0],
        f"systemd-run --unit={unit} --property=Restart=always --property=RestartSec=1 "
        "--property=TimeoutStopSec=2 -- /bin/sh -c \"trap '' TERM; while :; do sleep 1; done\"",
    )
    try:
        old = unit_property(host, unit, "MainPID")
        result = host.run(f"{RECOVER} {unit}")
        assert result.rc == 0, result.stdout + result.stderr
        assert f"main process {old}, SIGKILL after its TimeoutStopSec (2s)" in result.stdout
        assert wait_for(lambda: restarted(host, unit, old), timeout=15), result.stdout
    finally:
        host.run(f"systemctl stop {unit}; systemctl reset-failed {unit}")


@pytest.mark.units("celery-worker-health", "celery-worker")
def test_an_operator_stop_is_respected(host):
    needs(host, "celery_workers")
    unit, check = "celery-worker.service", "celery-worker-health.service"
    host.run_expect([0], f"systemctl stop {unit}")
    try:
        for _ in range(THRESHOLD + 1):
            result = host.run(f"systemctl start {check}")
            assert result.rc == 0, result.stderr
        assert unit_property(host, unit, "ActiveState") == "inactive"
        assert "Skipped due to 'exec-condition'" in journal(host, check)
    finally:
        host.run_expect([0], f"systemctl start {unit}")
    assert wait_for(lambda: worker_healthy(host), timeout=60)


@pytest.mark.units("celery-flower-health", "celery-health-recover@celery-flower", "celery-flower")
def test_flower_that_stopped_responding_is_restarted(host):
    needs(host, "flower")
    unit, check = "celery-flower.service", "celery-flower-health.service"
    old = unit_property(host, unit, "MainPID")
    host.run_expect([0], f"kill -STOP {old}")
    try:
        back = check_until_restarted(host, check, unit, old, timeout=120)
        assert back
    finally:
        host.run(f"kill -CONT {old}")
    healthy = "curl --silent --fail --max-time 5 http://127.0.0.1:5555/flower/healthcheck"
    assert wait_for(lambda: host.run(healthy).rc == 0, timeout=60)
