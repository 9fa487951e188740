"""A worker that answers pings but no longer takes tasks is found by `mailworker health worker`
(exit 1, so the health units restart it), at the default settings; a busy worker is not.

The stuck worker is made with Celery's own remote control: `cancel_consumer` stops its consumption
of a queue while its event loop, and so its answer to pings, go on (what celery #8030, #8384 and
#10205 saw after broker trouble). A broker outage gives exit 3 (tests/test_cli.py::
test_health_worker), which the health units never count.
"""

import subprocess
import time
import uuid

import pytest
import redis
from celery.utils.nodenames import host_format
from mailworker.progress import INTERVAL, Progress, judge_progress, progress_key
from mailworker.settings import load_settings

from tests.fixtures.servers import MAILWORKER, wait_until

HOLD = "tests.redelivery.hold"
TASKS = "tests.redelivery_tasks"


def health(worker) -> tuple[int, str]:
    completed = subprocess.run(
        [MAILWORKER, "health", "worker", "--timeout", "5"],
        env=worker.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return completed.returncode, completed.stdout.strip() + completed.stderr.strip()


@pytest.mark.slow
def test_a_worker_that_stopped_consuming_is_unhealthy_a_busy_one_is_not(default_fleet):
    stuck_after = load_settings(default_fleet.env).worker_stuck_after
    stuck = default_fleet.start_worker(wait=False, include=TASKS, MAILWORKER_QUEUES="periodic")
    # Busy: its one slot taken by a long task, more waiting in its queue.
    busy = default_fleet.start_worker(
        wait=False, include=TASKS, MAILWORKER_QUEUES="spam", MAILWORKER_CONCURRENCY="1"
    )
    stuck.wait_ready(60)
    busy.wait_ready(60)
    client = default_fleet.client()
    run = uuid.uuid4().hex
    long = stuck_after + 4 * INTERVAL
    client.send_task(HOLD, args=[f"busy-{run}", long, long], queue="spam")
    client.send_task(HOLD, args=[f"busy-{run}", long, long], queue="spam")
    broker = redis.Redis.from_url(default_fleet.env["MAILWORKER_BROKER_URL"])
    wait_until(lambda: broker.llen(f"busy-{run}") == 1, 30, "the busy worker's first task")

    node = host_format(stuck.node)
    replies = client.control.cancel_consumer("periodic", destination=[node], reply=True)
    assert replies, "the worker did not confirm cancelling its consumer"
    assert health(stuck)[0] == 0
    queued_at = time.monotonic()
    client.send_task(HOLD, args=[f"stuck-{run}", 0, 0], queue="periodic")

    verdicts = []
    while time.monotonic() - queued_at < stuck_after + 5 * INTERVAL:
        code, line = health(stuck)
        verdicts.append((round(time.monotonic() - queued_at), code, line))
        busy_code, busy_line = health(busy)
        assert busy_code == 0, busy_line
        if code == 1:
            break
        assert code == 0, line
        time.sleep(5)
    found_after = time.monotonic() - queued_at
    print(f"\nstuck worker found unhealthy {found_after:.0f} s after a task waited: {line}")
    assert code == 1, verdicts
    assert "answers pings but takes no tasks: 1 waiting in " in line
    assert stuck.ping()
    # Starved for WORKER_STUCK_AFTER, counted from the first record that saw it; on top, this
    # loop's own pace (two checks of a few seconds each on a loaded machine, then 5 s).
    assert stuck_after <= found_after <= stuck_after + 2 * INTERVAL + 30, verdicts
    assert broker.llen(f"stuck-{run}") == 0  # it really took nothing


@pytest.mark.slow
def test_a_restarted_worker_replaces_its_previous_process_record_at_once(default_fleet):
    # A node's record outlives its process (3 x WORKER_STUCK_AFTER): a worker started again after
    # a longer stop must not look stuck until its first interval.
    settings = load_settings(default_fleet.env)
    worker = default_fleet.start_worker(wait=False, include=TASKS, MAILWORKER_QUEUES="periodic")
    broker = redis.Redis.from_url(default_fleet.env["MAILWORKER_BROKER_URL"])
    key = progress_key(host_format(worker.node))
    stale = time.time() - settings.worker_stuck_after - 30
    broker.hset(
        key,
        mapping={
            "recorded_at": stale,
            "received_at": stale,
            "active": 0,
            "concurrency": 1,
            "waiting": 0,
            "queues": "periodic",
            "starved_since": 0,
        },
    )
    worker.wait_ready(60)
    record = Progress.from_hash(broker.hgetall(key))
    assert record.recorded_at > stale + settings.worker_stuck_after, record
    code, line = health(worker)
    assert code == 0, line


def _record(**changes) -> Progress:
    now = 1000.0
    values = {
        "recorded_at": now - 5,
        "received_at": now - 500,
        "active": 0,
        "concurrency": 4,
        "waiting": 3,
        "queues": ("periodic",),
        "starved_since": 0.0,
    }
    return Progress(**{**values, **changes})


@pytest.mark.parametrize(
    ("record", "verdict"),
    [
        (None, None),  # no record yet (a worker still starting)
        (_record(), None),  # idle, not starved: nothing waited through a whole record interval
        (_record(starved_since=1000.0 - 59), None),
        (_record(starved_since=1000.0 - 61), "takes no tasks: 3 waiting in periodic, 4 of 4"),
        (_record(recorded_at=1000.0 - 61), "recorded no progress for 61 s (limit 60 s)"),
    ],
)
def test_judge_progress(record, verdict):
    found = judge_progress(record, now=1000.0, stuck_after=60)
    assert found == verdict if verdict is None else verdict in found


def test_progress_round_trips_through_its_redis_hash():
    record = _record(starved_since=990.5)
    raw = {
        key.encode(): (",".join(value) if isinstance(value, tuple) else str(value)).encode()
        for key, value in record.__dict__.items()
    }
    assert Progress.from_hash(raw) == record
