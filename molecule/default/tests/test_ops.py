"""The fleet playbooks of playbooks/ops, run from the controller against the deployed stack.

An operator's checklist: the status report shows every unit, ping and queue; a rolling restart
while tasks keep arriving loses none of them; purge and revoke refuse without confirmation and
act with it; logs come back from the host. Each failure prints the playbook's output and the
journal of the workers.
"""

import json
import os
import re
import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import testinfra.utils.ansible_runner
from conftest import controller_env, said

_inventory = testinfra.utils.ansible_runner.AnsibleRunner(os.environ["MOLECULE_INVENTORY_FILE"])
testinfra_hosts = _inventory.get_hosts("celery_workers")[:1]

PROJECT = Path(os.environ.get("MOLECULE_PROJECT_DIRECTORY", Path(__file__).parents[3]))
PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"
# The admin wrapper of the mailworker_app role: the CLI as celeryworker with the units' env file.
MW = "/usr/local/sbin/mailworker"
QUEUES = ["sync", "send", "delete", "spam", "periodic"]
# Test-only IMAP account that molecule/default/prepare.yml creates in Dovecot.
IMAP_USER, IMAP_PASSWORD, IMAP_PORT = "alice@example.test", "lab-only-imap", 1143


def playbook(name: str, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """ansible-playbook playbooks/ops/NAME.yml against this scenario's inventory."""
    argv = [str(PLAYBOOK), "-i", str(Path(os.environ["MOLECULE_INVENTORY_FILE"]).parent)]
    for value in extra:
        argv += ["-e", value]
    argv.append(str(PROJECT / "playbooks" / "ops" / name))
    return subprocess.run(
        argv,
        cwd=PROJECT,
        env=controller_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def output(done: subprocess.CompletedProcess[str]) -> str:
    return f"\n--- rc={done.returncode} ---\n{done.stdout[-6000:]}\n{done.stderr[-3000:]}"


def journal(host) -> str:
    out = host.run("journalctl -u 'celery-worker*' -n 60 --no-pager -o short-precise").stdout
    return f"\n--- journalctl -u celery-worker* ---\n{out}"


def mw_json(host, *args: str):
    done = host.run(shlex.join([MW, *args, "--json"]))
    assert done.rc == 0, f"mailworker {' '.join(args)}: {done.stderr}{journal(host)}"
    return json.loads(done.stdout)


def waiting(host, queue: str) -> int:
    return next(
        row["messages"] for row in mw_json(host, "queue", "status") if row["queue"] == queue
    )


def wait_for(condition, timeout: float, step: float = 1.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()


@pytest.fixture(scope="module")
def imap_account(host) -> list[str]:
    """[tenant_id, user_id, account_id] of a fresh account on the test Dovecot."""
    command = shlex.join(
        [
            MW, "account", "add", "--tenant", f"ops-{uuid.uuid4().hex[:8]}", "--user", IMAP_USER,
            "--imap-host", "127.0.0.1", "--imap-port", str(IMAP_PORT), "--imap-security", "plain",
            "--smtp-host", "127.0.0.1", "--smtp-port", "2525", "--smtp-security", "plain",
            "--password-stdin",
        ]
    )  # fmt: skip
    done = host.run(f"printf '%s\\n' {shlex.quote(IMAP_PASSWORD)} | {command}")
    assert done.rc == 0, done.stderr
    ids = dict(line.split("=", 1) for line in done.stdout.split())
    return [ids["tenant_id"], ids["user_id"], ids["account_id"]]


def send_syncs(host, account: list[str], count: int) -> list[str]:
    """Queue `count` real sync_mailbox tasks in one process; return their ids."""
    script = (
        "import json, sys\n"
        "from mailworker.ops.envfile import apply_env_file\n"
        "apply_env_file(None)\n"
        "from mailworker.celery_app import app\n"
        "args, count = json.loads(sys.argv[1]), int(sys.argv[2])\n"
        "print(json.dumps([app.send_task('mailworker.tasks.sync.sync_mailbox', args=args).id"
        " for _ in range(count)]))\n"
    )
    done = host.run(
        shlex.join(
            ["/opt/mailworker/venv/bin/python", "-c", script, json.dumps(account), str(count)]
        )
    )
    assert done.rc == 0, done.stderr
    return json.loads(done.stdout)


def states(host, task_ids: list[str]) -> dict[str, str]:
    script = (
        "import json, sys\n"
        "from mailworker.ops.envfile import apply_env_file\n"
        "apply_env_file(None)\n"
        "from mailworker.celery_app import app\n"
        "print(json.dumps({i: app.AsyncResult(i).state for i in json.loads(sys.argv[1])}))\n"
    )
    done = host.run(
        shlex.join(["/opt/mailworker/venv/bin/python", "-c", script, json.dumps(task_ids)])
    )
    assert done.rc == 0, done.stderr
    return json.loads(done.stdout)


def nodes_answering(host) -> int:
    done = host.run(f"{MW} worker ping --this-host --json")
    return len(json.loads(done.stdout or "{}").get("replies", {})) if done.rc in (0, 1) else 0


def main_pid(host, unit: str) -> str:
    return host.check_output(f"systemctl show --property=MainPID --value {unit}")


def test_status_report_shows_units_pings_nodes_and_queues(host) -> None:
    done = playbook("status.yml")
    assert done.returncode == 0, output(done)
    report = said(done)
    for expected in ("UNITS", "celery-worker.service", "celery-beat.service", "WORKER NODES",
                     "QUEUES", "healthy: every unit running"):  # fmt: skip
        assert expected in report, f"{expected!r} missing{output(done)}"
    assert "nodes answer" in report
    for queue in QUEUES:  # a row per queue: name, waiting, unacked, overdue
        row = rf"^\s*{queue}\s+\d+\s+\d+\s+\d+\s*$"
        assert re.search(row, done.stdout, re.MULTILINE), output(done)

    deep = playbook("status.yml", "max_depth=-1")  # every queue holds more than -1 messages
    assert deep.returncode != 0
    assert "(max_depth -1)" in said(deep), output(deep)


def test_rolling_restart_while_tasks_arrive_loses_none(
    host, imap_account: list[str], tmp_path: Path
) -> None:
    before = main_pid(host, "celery-worker.service")
    sent = send_syncs(host, imap_account, 20)
    log_file = tmp_path / "restart.log"
    with log_file.open("w") as log_handle:
        restart = subprocess.Popen(
            [str(PLAYBOOK), "-i", str(Path(os.environ["MOLECULE_INVENTORY_FILE"]).parent),
             "-e", "only=worker,beat", str(PROJECT / "playbooks" / "ops" / "restart.yml")],
            cwd=PROJECT, env=controller_env(), stdout=log_handle, stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 600
            while restart.poll() is None and time.monotonic() < deadline:
                sent += send_syncs(host, imap_account, 5)  # keep sending through the restart
                time.sleep(1)
        finally:
            if restart.poll() is None:
                restart.kill()
            restart.wait()
    log = log_file.read_text()
    assert restart.returncode == 0, f"{log[-6000:]}{journal(host)}"
    assert main_pid(host, "celery-worker.service") != before, "the worker was not restarted"
    sent += send_syncs(host, imap_account, 5)

    final = {"SUCCESS"}
    finished = wait_for(lambda: set(states(host, sent).values()) <= final, 180, step=3)
    left = {i: s for i, s in states(host, sent).items() if s not in final}
    assert finished, f"{len(left)} of {len(sent)} tasks not SUCCESS: {left}{journal(host)}"


def test_purge_refuses_without_confirm_and_purges_with_it(host) -> None:
    nodes = nodes_answering(host)
    stopped = playbook("stop.yml", "only=worker")
    assert stopped.returncode == 0, output(stopped)
    try:
        for _ in range(3):  # waits in `delete`: no worker consumes while they are stopped
            send = host.run(
                shlex.join(
                    [
                        MW,
                        "task",
                        "send",
                        "mailworker.tasks.delete.delete_messages",
                        "--args",
                        json.dumps([str(uuid.uuid4())] * 3 + [[1]]),
                    ]
                )
            )
            assert send.rc == 0, send.stderr
        count = waiting(host, "delete")
        assert count >= 3

        refused = playbook("purge.yml", "queue=delete")
        assert refused.returncode != 0
        refusal = said(refused)
        assert f"would delete {count} waiting message(s) from queue 'delete'" in refusal, output(
            refused
        )
        assert "confirm=true" in refusal, output(refused)
        assert waiting(host, "delete") == count

        purged = playbook("purge.yml", "queue=delete", "confirm=true")
        assert purged.returncode == 0, output(purged)
        assert waiting(host, "delete") == 0
    finally:
        started = playbook("start.yml", "only=worker")
    assert started.returncode == 0, output(started)
    assert wait_for(lambda: nodes_answering(host) >= nodes, 90), journal(host)


def test_revoke_across_the_fleet_needs_confirm_only_to_terminate(host) -> None:
    task_id = str(uuid.uuid4())
    refused = playbook("revoke.yml", f"task_id={task_id}", "terminate=true")
    assert refused.returncode != 0
    assert f"would revoke task {task_id}" in said(refused), output(refused)

    revoked = playbook("revoke.yml", f"task_id={task_id}")
    assert revoked.returncode == 0, output(revoked)
    assert "flagged as revoked" in said(revoked), output(revoked)
    listed = host.run(shlex.join([MW, "task", "revoke", task_id, "--json"]))
    assert listed.rc == 0, listed.stderr


def test_logs_come_back_from_every_host(host, tmp_path: Path) -> None:
    done = playbook("logs.yml", "only=worker", "lines=5", f"logs_dir={tmp_path}")
    assert done.returncode == 0, output(done)
    saved = list(tmp_path.glob("*/celery-worker.service.txt"))
    assert saved, f"no journal saved under {tmp_path}{output(done)}"
    assert saved[0].read_text().strip(), "the saved journal is empty"


def test_clean_without_confirm_only_shows_the_plan(host) -> None:
    done = playbook("clean.yml", "what=all")
    assert done.returncode != 0
    plan = said(done)
    assert "re-run with -e confirm=true" in plan, output(done)
    assert "purge queue sync" in plan, output(done)
