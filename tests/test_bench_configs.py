"""The bench's deployments (bench/configs.py): the same-guarantees Celery app keeps every
guarantee the shipped worker gives and runs each shipped unit's pool, concurrency and prefetch;
nothing is started here except one short Python process that imports the app."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench.configs import REPO, result_backend_url, same_guarantees, shipped
from bench.layout import WorkerUnit

BROKER = "redis://127.0.0.1:6390/0"
UNITS = [
    WorkerUnit("celery-worker@io-1", ("send", "sync"), "threads", 20),
    WorkerUnit(
        "celery-worker@io-2",
        ("send", "sync"),
        "threads",
        12,
        settings=(("MAILWORKER_PREFETCH_MULTIPLIER", "3"),),
    ),
]


def _options(argv: tuple[str, ...]) -> dict[str, str]:
    return dict(arg[2:].split("=", 1) for arg in argv if arg.startswith("--") and "=" in arg)


def _app_conf(env: dict[str, str]) -> dict[str, object]:
    """bench.guarantees_app's configuration as a worker process sees it, and whether importing
    it (and its tasks) loaded anything of mailworker."""
    script = (
        "import json, sys\n"
        "from bench.guarantees_app import app\n"
        "app.loader.import_default_modules()\n"
        "c = app.conf\n"
        "keys = ['task_acks_late', 'task_reject_on_worker_lost', 'worker_send_task_events',\n"
        "        'task_send_sent_event', 'task_ignore_result', 'result_backend', 'broker_url']\n"
        "out = {k: c[k] for k in keys}\n"
        "out['mailworker'] = sorted(m for m in sys.modules if m.startswith('mailworker'))\n"
        "out['tasks'] = sorted(t for t in app.tasks if t.startswith('bench.'))\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env={**env, "PATH": os.environ.get("PATH", "")},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    conf: dict[str, object] = json.loads(done.stdout)
    return conf


def test_the_same_guarantees_app_keeps_every_guarantee_and_nothing_of_mailworker() -> None:
    deployment = same_guarantees(BROKER, "send", UNITS)
    conf = _app_conf(deployment.workers[0].env)
    assert conf["task_acks_late"] is True
    assert conf["task_reject_on_worker_lost"] is True
    assert conf["worker_send_task_events"] is True
    assert conf["task_send_sent_event"] is True
    assert conf["task_ignore_result"] is False
    assert conf["result_backend"] == "redis://127.0.0.1:6390/1"
    assert conf["broker_url"] == BROKER
    assert conf["mailworker"] == []
    assert conf["tasks"] == ["bench.io_wait", "bench.noop"]


def test_each_worker_runs_its_shipped_units_pool_concurrency_prefetch_and_queues() -> None:
    same = same_guarantees(BROKER, "send", UNITS)
    ours = shipped(BROKER, "send", UNITS)
    assert len(same.workers) == len(ours.workers) == 2
    for mine, theirs in zip(same.workers, ours.workers, strict=True):
        a, b = _options(mine.argv), _options(theirs.argv)
        for option in ("pool", "concurrency", "prefetch-multiplier", "queues", "loglevel"):
            assert a[option] == b[option], option
        assert "bench.guarantees_app" in mine.argv
        assert not any("mailworker" in arg for arg in mine.argv)
        assert not any(name.startswith("MAILWORKER_") for name in mine.env)
    # The unit's own prefetch is carried over, not Celery's default nor a constant.
    assert _options(same.workers[1].argv)["prefetch-multiplier"] == "3"
    assert _options(same.workers[1].argv)["concurrency"] == "12"
    hostnames = {_options(w.argv)["hostname"] for w in same.workers}
    assert len(hostnames) == 2
    assert same.concurrency == ours.concurrency == 32
    assert same.queue == "send"
    assert same.producer_app == "bench.guarantees_app:app"
    assert same.label == "same guarantees"


def test_a_sweep_concurrency_overrides_each_unit_alike() -> None:
    same = same_guarantees(BROKER, "send", UNITS, concurrency=4)
    assert [_options(w.argv)["concurrency"] for w in same.workers] == ["4", "4"]
    assert same.concurrency == 8


def test_no_unit_for_the_queue_is_an_error() -> None:
    with pytest.raises(ValueError, match="no shipped worker unit"):
        same_guarantees(BROKER, "send", [])


def test_results_go_to_database_one_of_the_broker() -> None:
    assert result_backend_url("redis://127.0.0.1:7000/0") == "redis://127.0.0.1:7000/1"
    with pytest.raises(ValueError, match="broker URL"):
        result_backend_url("redis://127.0.0.1:7000")
