"""The health checks under supervisor, as an operator checks them: the program celery-health runs
every check of the host; supervisor brings back a killed program at once; a program that stopped
responding (SIGSTOP) is restarted with a warm stop after the threshold of failed checks, while a
program an operator stopped stays stopped. The scenario checks every 10 s (inventory/group_vars).
"""

from __future__ import annotations

import pytest
from conftest import (
    APP_HOSTS,
    OUTPUT_DIR,
    main_pid,
    programs,
    restarted,
    status,
    wait_for,
    worker_healthy,
)

testinfra_hosts = APP_HOSTS
THRESHOLD = 3
INTERVAL = 10  # inventory/group_vars/supervised.yml
CHECK_LIMIT = 2 * 5 + 10  # a worker check's own bound: twice its 5 s timeout + 10 s
# A hung worker on a host whose CPU stays saturated (the other scenarios run beside this one) is
# restarted after at most 2 x THRESHOLD checks (THRESHOLD not counted, then THRESHOLD counted),
# each an interval plus at most the check's bound; then the warm restart (startsecs 6 s).
RESTART_BOUND = 2 * THRESHOLD * (INTERVAL + CHECK_LIMIT) + 30
HEALTH_LOG = f"{OUTPUT_DIR}/celery-health.log"
SUPERVISORD_LOG = "/var/log/supervisor/supervisord.log"


def log_lines(host, path: str) -> list[str]:
    return host.file(path).content_string.splitlines()


def group_alive(host, pgid: int) -> list[str]:
    """Processes of a process group that are not zombies (PID 1 of this container reaps none)."""
    members = ",".join(host.run(f"pgrep -g {pgid}").stdout.split())
    if not members:
        return []
    lines = host.run(f"ps -o pid=,stat=,args= -p {members}").stdout.splitlines()
    return [line for line in lines if line.split()[1][0] != "Z"]


@pytest.mark.programs("celery-worker")
def test_the_checker_runs_a_check_of_every_program(host):
    assert status(host, "celery-health") == "RUNNING"
    script = host.file("/usr/local/libexec/celery-health/celery-health-supervisor").content_string
    for program in programs(host):
        assert f"check_loop {program} " in script, program
    assert "setpriv --reuid=celeryworker --regid=celeryworker" in script
    state = host.file("/var/lib/mailworker/health")
    assert (state.user, state.mode) == ("celeryworker", 0o750)


@pytest.mark.programs("celery-worker")
def test_a_killed_worker_is_back_and_healthy(host):
    old = main_pid(host, "celery-worker")
    host.run_expect([0], f"kill -KILL {old}")
    assert wait_for(lambda: restarted(host, "celery-worker", old), timeout=60)
    assert wait_for(lambda: worker_healthy(host, "celery-worker"), timeout=60)
    # The pool processes of the killed main process end when their pipe to it closes.
    assert wait_for(lambda: not group_alive(host, old), timeout=30), group_alive(host, old)


@pytest.mark.programs("celery-worker", "celery-beat")
@pytest.mark.timeout(RESTART_BOUND + 240)
def test_a_hung_worker_is_restarted_while_a_stopped_program_stays_stopped(host):
    assert wait_for(lambda: worker_healthy(host, "celery-worker"), timeout=60)
    host.run_expect([0], "supervisorctl stop celery-beat")  # an operator's stop
    seen = len(log_lines(host, HEALTH_LOG))
    supervisord_seen = len(log_lines(host, SUPERVISORD_LOG))
    old = main_pid(host, "celery-worker")
    host.run_expect([0], f"kill -STOP {old}")
    try:
        restart = wait_for(
            lambda: restarted(host, "celery-worker", old), timeout=RESTART_BOUND, step=2
        )
        assert restart, "\n".join(log_lines(host, HEALTH_LOG)[seen:])
        assert status(host, "celery-beat") == "STOPPED"
    finally:
        host.run(f"kill -CONT {old}")  # only matters when the restart did not happen
        host.run("supervisorctl start celery-beat")
    log = "\n".join(log_lines(host, HEALTH_LOG)[seen:])
    assert f"celery-worker failed {THRESHOLD} health checks in a row" in log, log
    assert "restarting celery-worker after failed health checks" in log, log
    assert "celery-beat failed" not in log, log  # a stopped program is not checked
    # SIGCONT, then supervisor's TERM: a warm shutdown, no SIGKILL.
    supervisord = "\n".join(log_lines(host, SUPERVISORD_LOG)[supervisord_seen:])
    assert "stopped: celery-worker (exit status 0)" in supervisord, supervisord
    assert "SIGKILL" not in supervisord, supervisord
    assert wait_for(lambda: not group_alive(host, old), timeout=30), group_alive(host, old)
    assert wait_for(lambda: worker_healthy(host, "celery-worker"), timeout=60)
    assert status(host, "celery-beat") == "RUNNING"
