"""The ops commands (issue 4) against a real redis-server and a real worker process.

Each command runs as a subprocess, the way an operator types it. The module gets its own Redis
databases (broker 5, results 6) so queue counts are exact whatever other test modules leave.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from mailworker.cli.main import cli
from mailworker.ops.envfile import parse_env_file

from tests.fixtures.servers import (
    MAILWORKER,
    IncludingWorker,
    RedisServer,
    free_port,
    wait_until,
)

REPO = Path(__file__).resolve().parent.parent
BROKER_DB, RESULT_DB = 5, 6
# The worker consumes only these, so messages sent to `delete` stay waiting in Redis.
CONSUMED = "sync,periodic"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ops_env(app_env: dict[str, str], migrated_db: str, redis_server: RedisServer) -> dict[str, str]:
    for db in (BROKER_DB, RESULT_DB):
        redis_server.client(db).flushdb()
    base = f"redis://127.0.0.1:{redis_server.port}"
    return {
        **app_env,
        "MAILWORKER_BROKER_URL": f"{base}/{BROKER_DB}",
        "MAILWORKER_RESULT_BACKEND": f"{base}/{RESULT_DB}",
        "MAILWORKER_QUEUES": CONSUMED,
        "MAILWORKER_NODE_NAME": f"ops-{uuid.uuid4().hex[:8]}@%h",
        "PYTHONPATH": str(REPO),
    }


@pytest.fixture(scope="module")
def worker(
    ops_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[IncludingWorker]:
    log_file = tmp_path_factory.mktemp("ops-worker") / "worker.log"
    process = IncludingWorker(
        {**ops_env, "MAILWORKER_LOG_FILE": str(log_file)},
        log_file,
        ops_env["MAILWORKER_NODE_NAME"],
        include="tests.cli_ops_tasks",
    )
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def node(worker: IncludingWorker) -> str:
    return worker.node.replace("%h", os.uname().nodename)


@dataclass(frozen=True)
class Ran:
    returncode: int
    stdout: str
    stderr: str


def mw(env: dict[str, str], *args: str) -> Ran:
    """`mailworker ARGS` in this process (imports once); errors are one line, no traceback."""
    isolated = {k: None for k in os.environ if k.startswith("MAILWORKER_")}
    isolated.update({k: v for k, v in env.items() if k.startswith("MAILWORKER_")})
    result = CliRunner().invoke(cli, list(args), env=isolated)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"mailworker {' '.join(args)} raised") from result.exception
    ran = Ran(result.exit_code, result.stdout, result.stderr)
    if ran.returncode != 0 and not ran.stderr.startswith("Usage:"):  # click's own usage text
        assert len(ran.stderr.strip().splitlines()) == 1, ran.stderr
    return ran


def mw_process(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`mailworker ARGS` as its own process, exactly as an operator runs it."""
    done = subprocess.run(
        [MAILWORKER, *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        assert "Traceback" not in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    return done


def mw_json(env: dict[str, str], *args: str) -> object:
    done = mw(env, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def depth(env: dict[str, str], queue: str) -> dict[str, object]:
    rows = mw_json(env, "queue", "status")
    return next(row for row in rows if row["queue"] == queue)


def send(env: dict[str, str], name: str, args: list[object], *extra: str) -> str:
    sent = mw_json(env, "task", "send", name, "--args", json.dumps(args), *extra)
    return sent["id"]


def test_worker_ping_and_stats_name_the_node(ops_env: dict[str, str], node: str) -> None:
    pinged = mw(ops_env, "worker", "ping", "--node", node, "--timeout", "2")
    assert pinged.returncode == 0, pinged.stderr
    assert node in pinged.stdout
    assert "pong" in pinged.stdout

    stats = mw_json(ops_env, "worker", "stats", "--node", node, "--timeout", "2")
    assert stats[node]["pool"]["max-concurrency"] == 2

    missing = mw(ops_env, "worker", "ping", "--node", "nobody@nowhere", "--timeout", "1")
    assert missing.returncode == 1
    assert "no answer from nobody@nowhere" in missing.stderr


def test_registered_lists_the_application_tasks(ops_env: dict[str, str], node: str) -> None:
    registered = mw_json(ops_env, "tasks", "registered", "--node", node, "--timeout", "2")
    assert "mailworker.tasks.sync.sync_mailbox" in registered[node]
    assert "mailworker.tasks.send.send_email" in registered[node]


def test_queue_status_purge_refuses_without_yes(
    ops_env: dict[str, str], worker: IncludingWorker
) -> None:
    before = depth(ops_env, "delete")["messages"]
    for priority in ("0", "7"):  # kombu keeps each priority in its own list; both must count
        sent = mw(
            ops_env, "task", "send", "mailworker.tasks.delete.delete_messages", "--queue", "delete",
            "--priority", priority, "--args", json.dumps([str(uuid.uuid4())] * 3 + [[1]]),
        )  # fmt: skip
        assert sent.returncode == 0, sent.stderr
    assert depth(ops_env, "delete")["messages"] == before + 2

    refused = mw(ops_env, "queue", "purge", "delete")
    assert refused.returncode == 2
    assert f"would delete {before + 2} waiting message(s) from queue 'delete'" in refused.stderr
    assert depth(ops_env, "delete")["messages"] == before + 2

    purged = mw_json(ops_env, "queue", "purge", "delete", "--yes")
    assert purged == {"queue": "delete", "deleted": before + 2}
    assert depth(ops_env, "delete")["messages"] == 0

    table = mw_process(ops_env, "queue", "status")
    assert table.stdout.splitlines()[0].split() == [
        "QUEUE",
        "WAITING",
        "UNACKED",
        "OVERDUE",
        "CONFIGURED",
    ]


def test_running_task_is_active_unacked_and_terminated_only_with_yes(
    ops_env: dict[str, str], node: str
) -> None:
    task_id = send(ops_env, "tests.ops.hold", [60])

    def running() -> bool:
        active = mw_json(ops_env, "tasks", "active", "--node", node, "--timeout", "1")
        return any(t["id"] == task_id for t in active.get(node, []))

    wait_until(running, 20, f"task {task_id} to run")
    assert depth(ops_env, "periodic")["unacked"] >= 1  # acks_late: unacked while it runs
    status = mw_json(ops_env, "task", "status", task_id)
    assert status["state"] == "ACTIVE"
    assert status["where"] == node

    refused = mw(ops_env, "task", "revoke", task_id, "--terminate", "--timeout", "1")
    assert refused.returncode == 2
    assert f"would revoke task {task_id} and send SIGTERM" in refused.stderr
    assert f"{node} (active)" in refused.stderr
    assert running()

    revoked = mw_json(ops_env, "task", "revoke", task_id, "--terminate", "--yes", "--timeout", "2")
    assert node in revoked["replies"]
    state = wait_until(
        lambda: mw_json(ops_env, "task", "status", task_id)["state"] == "REVOKED", 20, "REVOKED"
    )
    assert state
    listed = mw_json(ops_env, "tasks", "failed", "--state", "REVOKED")
    assert task_id in [row["id"] for row in listed]


def test_send_wait_reports_success_and_failure(
    ops_env: dict[str, str], worker: IncludingWorker
) -> None:
    ok = mw(ops_env, "task", "send", "tests.ops.hold", "--args", "[0]", "--wait", "20")
    assert ok.returncode == 0, ok.stderr
    assert "SUCCESS" in ok.stdout

    # A malformed tenant id is a permanent failure: FAILURE at once, no retry.
    failed = mw(
        ops_env, "task", "send", "mailworker.tasks.sync.sync_mailbox",
        "--args", '["not-a-uuid", "x", "y"]', "--wait", "20", "--json",
    )  # fmt: skip
    assert failed.returncode == 1
    outcome = json.loads(failed.stdout)
    assert outcome["state"] == "FAILURE"

    status = mw_json(ops_env, "task", "status", outcome["id"])
    assert status["state"] == "FAILURE"
    assert status["where"] == "result backend"
    recent = {row["id"]: row for row in mw_json(ops_env, "tasks", "failed")}
    assert recent[outcome["id"]]["result"].startswith("InvalidTaskArguments: tenant_id")


def test_bad_input_is_one_line_with_its_exit_code(
    ops_env: dict[str, str], worker: IncludingWorker
) -> None:
    malformed = mw(ops_env, "task", "status", "12345")
    assert (malformed.returncode, malformed.stderr.startswith("error: malformed task id")) == (
        2,
        True,
    )

    unknown = mw(ops_env, "task", "status", str(uuid.uuid4()), "--timeout", "1")
    assert unknown.returncode == 1
    assert "not found" in unknown.stderr

    queue = mw(ops_env, "queue", "purge", "nosuch", "--yes")
    assert queue.returncode == 2
    assert "unknown queue 'nosuch'" in queue.stderr

    task = mw(ops_env, "task", "send", "no.such.task")
    assert task.returncode == 2
    assert "unknown task 'no.such.task'" in task.stderr

    args = mw(ops_env, "task", "send", "tests.ops.hold", "--args", "[1,")
    assert args.returncode == 2
    assert "--args is not valid JSON" in args.stderr

    usage = mw(ops_env, "queue", "purge")
    assert usage.returncode == 2

    dead = {**ops_env, "MAILWORKER_BROKER_URL": f"redis://:secret@127.0.0.1:{free_port()}/0"}
    for command in (["queue", "status"], ["worker", "ping"], ["tasks", "active"]):
        started = time.monotonic()
        run = mw_process if command[0] == "queue" else mw  # one as its own process suffices
        done = run(dead, *command, "--timeout", "2")
        assert done.returncode == 1
        assert "cannot reach the broker at redis://:****" in done.stderr
        assert "secret" not in done.stderr
        assert time.monotonic() - started < 8


def test_env_file_supplies_the_settings(ops_env: dict[str, str], tmp_path: Path) -> None:
    env_file = tmp_path / "mailworker.env"
    lines = ["# written like the deployed EnvironmentFile", ""]
    lines += [f'{k}="{v}"' for k, v in ops_env.items() if k.startswith("MAILWORKER_")]
    env_file.write_text("\n".join(lines) + "\n")
    bare = {k: v for k, v in ops_env.items() if not k.startswith("MAILWORKER_")}

    done = mw_process(bare, "queue", "status", "--env-file", str(env_file), "--json")
    assert done.returncode == 0, done.stderr
    assert {row["queue"] for row in json.loads(done.stdout)} >= {"sync", "send", "periodic"}

    # `task send` reads the application's task registry too: it must see the file's settings.
    sent = mw_process(
        bare, "task", "send", "mailworker.tasks.delete.delete_messages", "--queue", "delete",
        "--args", json.dumps([str(uuid.uuid4())] * 3 + [[1]]), "--env-file", str(env_file),
    )  # fmt: skip
    assert sent.returncode == 0, sent.stderr

    missing = mw(bare, "queue", "status", "--env-file", str(tmp_path / "absent.env"))
    assert missing.returncode == 2
    assert "does not exist" in missing.stderr

    env_file.write_text("MAILWORKER_BROKER_URL=redis://x\nnot a setting line\n")
    broken = mw(bare, "queue", "status", "--env-file", str(env_file))
    assert broken.returncode == 2
    assert "line 2 is not KEY=VALUE" in broken.stderr


def test_env_file_parsing_follows_systemd() -> None:
    parsed = parse_env_file(
        '# comment\n; also a comment\nA=plain\nB="double \\"quoted\\""\nC=\'single $x\'\n'
        "D=joined \\\nline\n E = spaced \n"
    )
    assert parsed == {
        "A": "plain",
        "B": 'double "quoted"',
        "C": "single $x",
        "D": "joined line",
        "E": "spaced",
    }


def test_clean_shows_the_plan_and_removes_only_with_yes(
    ops_env: dict[str, str], redis_server: RedisServer, node: str, tmp_path: Path
) -> None:
    send(ops_env, "tests.ops.hold", [0], "--wait", "20")
    results = redis_server.client(RESULT_DB)
    assert results.keys("celery-task-meta-*")

    refused = mw(ops_env, "clean", "results")
    assert refused.returncode == 2
    assert "task results in the result backend" in refused.stdout
    assert results.keys("celery-task-meta-*")

    plan = mw_json(ops_env, "clean", "results", "--dry-run")
    assert plan["done"] is False
    assert plan["plan"][0]["amount"] >= 1

    removed = mw_json(ops_env, "clean", "results", "--yes")
    assert removed["removed"][0]["amount"] >= 1
    assert not results.keys("celery-task-meta-*")

    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "worker.log").write_text("current\n")
    (logs / "worker.log.1.gz").write_bytes(b"old")
    cleaned = mw_json(ops_env, "clean", "logs", "--log-dir", str(logs), "--yes")
    assert {row["target"] for row in cleaned["removed"]} == {
        f"truncate {logs / 'worker.log'}",
        f"delete {logs / 'worker.log.1.gz'}",
    }
    assert (logs / "worker.log").read_text() == ""
    assert not (logs / "worker.log.1.gz").exists()

    # With a worker online, clean redis keeps the unacknowledged messages it may be running.
    redis_plan = mw_json(ops_env, "clean", "redis", "--dry-run", "--timeout", "1")
    notes = [row["note"] for row in redis_plan["plan"] if row["note"]]
    assert any(node in note and note.startswith("kept") for note in notes)


def test_flower_url_is_the_proxied_one_and_check_fails_when_down(ops_env: dict[str, str]) -> None:
    env = {**ops_env, "MAILWORKER_FLOWER_PORT": str(free_port())}
    shown = mw(env, "flower", "url", "--host", "fleet.example")
    assert shown.stdout.strip() == "https://fleet.example/flower/"
    down = mw(env, "flower", "url", "--host", "fleet.example", "--check", "--timeout", "1")
    assert down.returncode == 1
    assert "Flower does not answer" in down.stderr
