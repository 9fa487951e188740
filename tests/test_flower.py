"""`mailworker run flower` starts the Flower that launch.build_argv describes: under its URL
prefix, read-only, behind its own basic auth even on loopback, and with no task history on disk.

Every Flower here is a real process (`mailworker run flower`) on the session's Redis.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import signal
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from mailworker.errors import ConfigurationError
from mailworker.launch import build_argv, flower_supports, read_only_options
from mailworker.settings import load_settings

from tests.fixtures.outbox import submit
from tests.fixtures.servers import MAILWORKER, celery_client, free_port, wait_until

pytestmark = pytest.mark.slow

SEND = "mailworker.tasks.send.send_email"
CREDENTIALS = f"flower-proxy:{secrets.token_hex(16)}"


def status(url: str, method: str = "GET", credentials: str | None = None) -> int:
    return _request(url, method, credentials)[0]


def _request(url: str, method: str = "GET", credentials: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if credentials is not None:
        token = base64.b64encode(credentials.encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def flower_env(env: dict[str, str], state: Path, **overrides: str) -> dict[str, str]:
    """`env` for one Flower on a free port, its state file in `state`, with its credentials."""
    state.mkdir(exist_ok=True)
    flower = {
        **env,
        "MAILWORKER_FLOWER_PORT": str(free_port()),
        "MAILWORKER_FLOWER_DB": str(state / "flower.db"),
        "FLOWER_BASIC_AUTH": CREDENTIALS,
    }
    flower.pop("FLOWER_UNAUTHENTICATED_API", None)
    flower.update(overrides)
    return flower


@contextlib.contextmanager
def running_flower(env: dict[str, str], log_file: Path) -> Iterator[str]:
    """A started Flower (its /healthcheck answers); stopped with SIGTERM on the way out."""
    log = log_file.open("wb")
    flower = subprocess.Popen(
        [MAILWORKER, "run", "flower"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    port = env["MAILWORKER_FLOWER_PORT"]
    base = f"http://127.0.0.1:{port}/flower"
    try:
        wait_until(
            lambda: flower.poll() is not None or status(f"{base}/healthcheck") == 200,
            40,
            f"Flower on port {port}",
            interval=0.3,
        )
        assert flower.poll() is None, log_file.read_text(errors="replace")
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(flower.pid, signal.SIGTERM)
        flower.wait(20)
        log.close()


def test_flower_refuses_local_users_without_its_credentials(isolated_env, tmp_path):
    env = flower_env(isolated_env, tmp_path / "state")
    wrong = CREDENTIALS.partition(":")[0] + ":not-the-password"
    with running_flower(env, tmp_path / "flower.log") as base:
        # Pages show task arguments and results, the API the same and more: on loopback too.
        closed = ["api/workers", "api/tasks", "api/task/types", "workers", "tasks", "broker"]
        closed.append(f"task/{uuid.uuid4()}")
        for path in closed:
            assert status(f"{base}/{path}") == 401, path
            assert status(f"{base}/{path}", credentials=wrong) == 401, path
        for path in ("api/workers", "api/tasks", "workers", "tasks"):
            assert status(f"{base}/{path}", credentials=CREDENTIALS) == 200, path
        # The health timer (celery_health) asks /healthcheck without credentials: Flower exempts it.
        assert status(f"{base}/healthcheck") == 200
        assert status(f"{base.rpartition('/')[0]}/workers", credentials=CREDENTIALS) == 404
        # Read-only: control calls are refused to the authenticated client as well.
        shutdown = f"{base}/api/worker/shutdown/anyone"
        assert status(shutdown, method="POST", credentials=CREDENTIALS) == 403


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"FLOWER_BASIC_AUTH": ""}, "FLOWER_BASIC_AUTH is not set"),
        ({"FLOWER_BASIC_AUTH": "flower-proxy:"}, "FLOWER_BASIC_AUTH: entry 1"),
        ({"FLOWER_UNAUTHENTICATED_API": "true"}, "FLOWER_UNAUTHENTICATED_API is set"),
    ],
    ids=["no-credentials", "empty-password", "unauthenticated-api"],
)
def test_flower_without_auth_refuses_to_start(isolated_env, tmp_path, overrides, named):
    env = flower_env(isolated_env, tmp_path / "state", **overrides)
    ran = subprocess.run(
        [MAILWORKER, "run", "flower"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert ran.returncode == 1, ran.stdout + ran.stderr
    assert named in ran.stderr, ran.stderr
    assert CREDENTIALS.partition(":")[2] not in ran.stdout + ran.stderr


def test_read_only_is_refused_not_dropped_when_flower_lacks_it():
    assert read_only_options(supported=True) == ["--read_only=True"]
    with pytest.raises(ConfigurationError, match="MAILWORKER_FLOWER_READ_ONLY is true"):
        read_only_options(supported=False)


def test_flower_without_read_only_option_refuses_to_build_its_command(app_env):
    """A Flower before 2.1, honestly: Flower's own option registry without `read_only`."""
    import flower.options  # noqa: F401, PLC0415 - registers Flower's options
    from tornado.options import options  # noqa: PLC0415

    registry = options._options  # the registry Flower's options live in
    option = registry.pop("read-only")
    flower_supports.cache_clear()
    try:
        assert not flower_supports("read_only")
        with pytest.raises(ConfigurationError, match=r"has no --read_only \(it arrived in"):
            build_argv("flower", load_settings(app_env))
        # The operator who asks for control operations gets a Flower without the option.
        argv = build_argv(
            "flower", load_settings({**app_env, "MAILWORKER_FLOWER_READ_ONLY": "false"})
        )
        assert not any(arg.startswith("--read_only") for arg in argv), argv
    finally:
        registry["read-only"] = option
        flower_supports.cache_clear()
    assert "--read_only=True" in build_argv("flower", load_settings(app_env))


def private_marks() -> dict[str, str]:
    """A recipient, subject and body no page or file may show."""
    return {
        "to": f"private-{secrets.token_hex(6)}@example.org",
        "subject": f"Private subject {secrets.token_hex(6)}",
        "body": f"Private body {secrets.token_hex(6)}",
    }


def wait_for_heartbeats(base: str) -> None:
    wait_until(
        lambda: b"flower_worker_online{" in _request(f"{base}/metrics")[1],
        30,
        "the worker's heartbeats in Flower",
        interval=0.5,
    )


def _failed_send_with_private_content(env: dict[str, str], marks: dict[str, str]) -> str:
    """A send_email whose arguments hold `marks`; it fails at once (no such tenant or draft)."""
    ids = [str(uuid.uuid4()) for _ in range(3)]
    message = {"to": [marks["to"]], "subject": marks["subject"], "body": marks["body"]}
    return celery_client(env).send_task(SEND, args=[*ids, message]).id


@pytest.mark.parametrize("persistent", [None, "true"], ids=["default", "persistent"])
def test_flower_keeps_no_task_arguments_on_disk(isolated_env, start_worker, tmp_path, persistent):
    marks = private_marks()
    state = tmp_path / "state"
    overrides = {} if persistent is None else {"MAILWORKER_FLOWER_PERSISTENT": persistent}
    env = flower_env(isolated_env, state, **overrides)
    start_worker(isolated_env)  # task events on, as by default
    with running_flower(env, tmp_path / "flower.log") as base:
        # Flower consumes events once it shows the worker's heartbeats; a task sent earlier
        # could reach it without its task-received event (the one with the arguments).
        wait_for_heartbeats(base)
        task_id = _failed_send_with_private_content(isolated_env, marks)

        def seen() -> bool:
            code, body = _request(f"{base}/api/tasks", credentials=CREDENTIALS)
            task = json.loads(body).get(task_id, {}) if code == 200 else {}
            return task.get("state") == "FAILURE" and marks["subject"] in str(task.get("args"))

        # Flower holds the task and its arguments in memory before it stops.
        wait_until(seen, 30, f"task {task_id} with its arguments in Flower")
    saved = {path.name: path.read_bytes() for path in state.iterdir() if path.is_file()}
    leaked = sorted(
        name for name, data in saved.items() for mark in marks.values() if mark.encode() in data
    )
    if persistent is None:
        assert not saved, f"Flower wrote {sorted(saved)} with persistence off"
        assert not leaked
    else:
        # What the default avoids: the shelve keeps the arguments of every task it saw.
        assert leaked, f"no argument in {sorted(saved)}: the check above would prove nothing"


def test_a_real_send_shows_no_mail_content_in_flower(
    isolated_env, start_worker, make_account, tmp_path
):
    # The outbox keeps the message in PostgreSQL: Flower sees ids in the arguments and counts in
    # the result, nothing of the recipients, subject or body (in its API, its pages or on disk).
    marks = private_marks()
    state = tmp_path / "state"
    env = flower_env(isolated_env, state, MAILWORKER_FLOWER_PERSISTENT="true")
    start_worker(isolated_env)
    account = make_account()
    with running_flower(env, tmp_path / "flower.log") as base:
        wait_for_heartbeats(base)
        message = {"to": [marks["to"]], "subject": marks["subject"], "body": marks["body"]}
        entry, result = submit(
            load_settings(isolated_env), celery_client(isolated_env), account, message
        )
        assert result is not None
        assert result.get(timeout=60)["status"] == "sent"

        def shown() -> dict:
            code, body = _request(f"{base}/api/tasks", credentials=CREDENTIALS)
            task = json.loads(body).get(result.id, {}) if code == 200 else {}
            return task if task.get("state") == "SUCCESS" else {}

        task = wait_until(shown, 30, f"task {result.id} succeeded in Flower")
        assert str(entry.outbox_id) in str(task.get("args")), task  # Flower does show arguments
        pages = [
            _request(f"{base}/api/tasks", credentials=CREDENTIALS),
            _request(f"{base}/api/task/info/{result.id}", credentials=CREDENTIALS),
            _request(f"{base}/task/{result.id}", credentials=CREDENTIALS),
        ]
    assert [code for code, _ in pages] == [200, 200, 200]
    saved = [path.read_bytes() for path in state.iterdir() if path.is_file()]
    assert saved, "persistence was on: Flower should have written its state"
    for data in [body for _, body in pages] + saved:
        for name, mark in marks.items():
            assert mark.encode() not in data, f"the {name} reached Flower"
