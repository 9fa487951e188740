"""The fleet playbooks of playbooks/ops against a host whose units supervisor runs: they read the
unit model, so the same commands report, stop, start, restart and fetch the logs of programs."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import APP_HOSTS, main_pid, playbook, programs, said, status, wait_for

testinfra_hosts = APP_HOSTS


def output(done) -> str:
    return f"\n--- rc={done.returncode} ---\n{done.stdout[-6000:]}\n{done.stderr[-3000:]}"


def worker_programs(host) -> list[str]:
    return [name for name in programs(host) if name.startswith("celery-worker")]


@pytest.mark.programs("celery-flower")
def test_stop_status_and_start_act_on_the_programs_of_the_model(host):
    stopped = playbook("ops/stop.yml", "-e", "only=flower")
    try:
        assert stopped.returncode == 0, output(stopped)
        assert status(host, "celery-flower") == "STOPPED"
        report = playbook("ops/status.yml")
        assert report.returncode != 0  # a unit that is not running fails the report
        shown = said(report)
        assert "celery-flower is stopped" in shown, output(report)
        assert " celery-flower stopped supervisor" in shown, output(report)
        for program in [*programs(host), "celery-health"]:
            if program != "celery-flower":
                assert f" {program} running supervisor" in shown, f"{program}{output(report)}"
        assert "redis-server.service running" in shown, output(report)
    finally:
        started = playbook("ops/start.yml", "-e", "only=flower")
    assert started.returncode == 0, output(started)
    assert status(host, "celery-flower") == "RUNNING"


@pytest.mark.programs("celery-worker", "celery-worker@io")
def test_rolling_restart_restarts_every_worker_program(host):
    before = {name: main_pid(host, name) for name in worker_programs(host)}
    done = playbook("ops/restart.yml", "-e", "only=worker")
    assert done.returncode == 0, output(done)
    for name, pid in before.items():
        assert wait_for(lambda n=name, p=pid: main_pid(host, n) not in (0, p), timeout=10), name
    assert "Wait until every worker node of the host answers ping" in said(done)


def test_logs_come_back_from_the_programs_and_their_log_files(host, tmp_path: Path):
    options = ["-e", "only=worker", "-e", "lines=5", "-e", f"logs_dir={tmp_path}"]
    done = playbook("ops/logs.yml", *options)
    assert done.returncode == 0, output(done)
    saved = {path.name for path in tmp_path.glob("*/*.txt")}
    assert {"celery-worker.out.txt", "worker.log.txt"} <= saved, f"{saved}{output(done)}"
    assert not any(name.endswith(".service.txt") for name in saved)
