"""What an operator checks on a host without systemd: supervisor runs one program per unit of the
model, each as celeryworker, each PID the Celery main process, with a warm stop that outlasts the
hard time limit, Flower's credentials from its root-only file and logs where the units write them.
"""

from __future__ import annotations

import re

import pytest
from conftest import (
    APP_HOSTS,
    OUTPUT_DIR,
    main_pid,
    program_settings,
    programs,
    send_task,
    status,
    unit_settings,
    wait_for,
)

testinfra_hosts = APP_HOSTS

# What `mailworker run SERVICE` execs, as seen in the main process's command line.
MAIN_PROCESS = {
    "worker": "-m mailworker.worker_command",
    "beat": " beat ",
    "flower": " flower ",
}
# Flower exempts /healthcheck and /metrics from its own auth: its API is not.
FLOWER = "http://127.0.0.1:5555/flower/api/workers"


def service_of(host, program: str) -> str:
    return program_settings(host, program)["command"].rsplit(" run ", 1)[1].strip()


def test_pid_1_is_not_systemd_and_supervisord_runs(host):
    assert host.file("/proc/1/comm").content_string.strip() != "systemd"
    assert not host.file("/run/systemd/system").exists
    assert host.process.filter(comm="supervisord")


@pytest.mark.programs("celery-worker", "celery-worker@io", "celery-beat", "celery-flower")
def test_every_unit_of_the_model_is_a_running_program(host):
    units = sorted(
        path.rsplit("/", 1)[1].removesuffix(".env")
        for path in host.run("ls /etc/mailworker/celery-*.env").stdout.split()
        if not path.endswith("-auth.env")
    )
    assert sorted(programs(host)) == units
    assert "celery-worker@io" in units  # an instance: '@' is fine in a program name
    for program in [*units, "celery-health"]:
        assert status(host, program) == "RUNNING", host.run("supervisorctl status").stdout


def test_no_systemd_unit_of_the_model_is_installed(host):
    assert not host.run("ls /etc/systemd/system/celery-*.service").stdout.strip()


@pytest.mark.programs("celery-worker", "celery-worker@io", "celery-beat", "celery-flower")
def test_each_program_is_the_celery_main_process_running_as_celeryworker(host):
    uid = host.user("celeryworker").uid
    for program in programs(host):
        pid = main_pid(host, program)
        assert pid, f"{program} has no PID"
        cmdline = host.file(f"/proc/{pid}/cmdline").content_string.replace("\0", " ")
        assert MAIN_PROCESS[service_of(host, program)] in cmdline, cmdline
        # The main process and its pool children alike (the process group supervisor made).
        members = ",".join(host.check_output(f"pgrep -g {pid}").split())
        group = host.check_output(f"ps -o uid=,stat= -p {members}").splitlines()
        for line in group:
            process_uid, state = line.split()
            assert int(process_uid) == uid or state.startswith("Z"), f"{program}: {line}"


def test_warm_stop_outlasts_the_hard_time_limit(host):
    for program in programs(host):
        keys = program_settings(host, program)
        assert keys["stopsignal"] == "TERM"
        assert keys["stopasgroup"] == "false"  # TERM to the main process only: a warm shutdown
        assert keys["killasgroup"] == "true"  # pool children killed only after stopwaitsecs
        assert keys["autorestart"] == "true"
        settings = unit_settings(host, program)
        if "MAILWORKER_TIME_LIMIT" in settings:
            assert int(keys["stopwaitsecs"]) > int(settings["MAILWORKER_TIME_LIMIT"]), program
        else:
            assert int(keys["stopwaitsecs"]) == 30, program


def test_prefork_recycles_a_pool_process_beyond_its_share_of_the_memory_ceiling(host):
    for program in programs(host):
        settings = unit_settings(host, program)
        if service_of(host, program) != "worker":
            continue
        cmdline = host.file(f"/proc/{main_pid(host, program)}/cmdline").content_string
        limits = re.findall(r"--max-memory-per-child=(\d+)", cmdline)
        if settings["MAILWORKER_POOL"] == "prefork":
            # 512M (the lab's worker ceiling) shared by the main process and 2 pool processes.
            expected = 512 * 1024 // (int(settings["MAILWORKER_CONCURRENCY"]) + 1)
            assert limits == [str(expected)], cmdline
        else:
            assert limits == [], cmdline


def test_flower_reads_its_root_only_credentials(host):
    auth = host.file("/etc/mailworker/celery-flower-auth.env")
    assert (auth.user, auth.group, auth.mode) == ("root", "root", 0o600)
    password = re.search(r'FLOWER_BASIC_AUTH="([^"]*)"', auth.content_string).group(1)
    assert host.run(f"curl -s -o /dev/null -w '%{{http_code}}' {FLOWER}").stdout == "401"
    answered = host.run(f"curl -s -o /dev/null -w '%{{http_code}}' -u {password} {FLOWER}")
    assert answered.stdout == "200"
    secret = password.split(":", 1)[1]
    assert secret not in host.file("/etc/supervisor/conf.d/mailworker.conf").content_string
    assert secret not in host.check_output("ps -eo args")


def test_logs_are_where_the_units_write_them(host):
    for program in programs(host):
        log_file = unit_settings(host, program).get("MAILWORKER_LOG_FILE")
        if log_file:
            log = host.file(log_file)
            assert log.user == "celeryworker", log_file
            assert log.size > 0, log_file
        output = host.file(f"{OUTPUT_DIR}/{program}.log")
        assert output.exists, output.path
    # Outside the logrotate stanza (supervisor rotates the output itself, without a signal).
    stanza = host.file("/etc/logrotate.d/mailworker").content_string
    assert "/var/log/mailworker/*.log {" in stanza
    assert "postrotate" not in stanza
    assert host.file(OUTPUT_DIR).group == "celeryworker"
    assert host.file(OUTPUT_DIR).user == "root"


@pytest.mark.programs("celery-worker")
def test_a_rotated_worker_log_is_reopened_without_a_signal(host):
    before = main_pid(host, "celery-worker")
    rotated = host.run("logrotate --force /etc/logrotate.d/mailworker")
    assert rotated.rc == 0, rotated.stderr
    assert host.file("/var/log/mailworker/worker.log.1").exists
    # A task of the main worker's queue writes to the new file; the worker was not signalled.
    done = send_task(host, "mailworker.tasks.periodic.resubmit_due_sends", [], wait=60)
    assert done["state"] == "SUCCESS", done
    assert wait_for(lambda: host.file("/var/log/mailworker/worker.log").size > 0, timeout=10)
    assert main_pid(host, "celery-worker") == before
