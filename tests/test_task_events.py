"""Task events reach Flower whole and in batches (mailworker.consumer), at the default settings.

What is counted is what Flower receives: the messages the worker publishes on Redis's event
channel (`celeryev`), read with a pattern subscription beside the worker, each a single event
or a batch of them.
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis
from mailworker.consumer import EVENTS_FLUSH_EVERY

from tests.fixtures.servers import RedisServer, free_port, wait_until

HOLD = "tests.redelivery.hold"
TASKS = "tests.redelivery_tasks"
STATES = ("task-received", "task-started", "task-succeeded")


class EventTap:
    """Every event message published on the broker's Redis while the tap is open."""

    def __init__(self, broker_url: str) -> None:
        self._pubsub = redis.Redis.from_url(broker_url).pubsub(ignore_subscribe_messages=True)
        self._pubsub.psubscribe("*celeryev*")
        self.publishes = 0  # the messages that carried a task's received, started or succeeded
        self.events: list[dict] = []

    def read(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            message = self._pubsub.get_message(timeout=min(left, 0.2))
            if message is None:
                continue
            payload = json.loads(message["data"])
            body = payload["body"]
            if payload["properties"].get("body_encoding") == "base64":
                body = base64.b64decode(body)
            decoded = json.loads(body)
            events = decoded if isinstance(decoded, list) else [decoded]
            self.publishes += any(event.get("type") in STATES for event in events)
            self.events.extend(events)

    def states(self, task_ids: set[str]) -> Counter:
        """How many of each worker event (STATES) the tasks `task_ids` had."""
        return Counter(
            e["type"] for e in self.events if e.get("uuid") in task_ids and e["type"] in STATES
        )

    def close(self) -> None:
        self._pubsub.close()


@contextmanager
def event_tap(broker_url: str) -> Iterator[EventTap]:
    tap = EventTap(broker_url)
    try:
        yield tap
    finally:
        tap.close()


def _read_until(tap: EventTap, task_ids: set[str], states: tuple[str, ...], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        counts = tap.states(task_ids)
        if all(counts[state] >= len(task_ids) for state in states):
            return
        tap.read(0.5)


@pytest.mark.slow
def test_a_burst_of_tasks_reaches_flower_whole_in_few_messages(default_fleet):
    worker = default_fleet.start_worker(include=TASKS, MAILWORKER_QUEUES="periodic")
    client = default_fleet.client()
    count = 200
    with event_tap(default_fleet.env["MAILWORKER_BROKER_URL"]) as tap:
        run = uuid.uuid4().hex
        ids = {client.send_task(HOLD, args=[run, 0, 0], queue="periodic").id for _ in range(count)}
        _read_until(tap, ids, STATES, 60)
        counts = tap.states(ids)
        task_publishes = tap.publishes
    assert worker.process is not None
    assert worker.process.poll() is None, worker.log[-3000:]
    # Every task's three events, none twice.
    assert {state: counts[state] for state in STATES} == dict.fromkeys(STATES, count), counts
    # Celery alone publishes about 1.3 messages per task (docs/benchmarks.md); batched, a message
    # holds up to 24 events (the producer's task-sent events are not counted).
    assert task_publishes <= count // 2, f"{task_publishes} messages for {count} tasks"


@pytest.mark.slow
def test_a_lone_task_shows_each_event_within_the_flush_interval(default_fleet):
    """The events after the first go out by the consumer's timer, not by the next event."""
    default_fleet.start_worker(include=TASKS, MAILWORKER_QUEUES="periodic")
    client = default_fleet.client()
    with event_tap(default_fleet.env["MAILWORKER_BROKER_URL"]) as tap:
        tap.read(2 * EVENTS_FLUSH_EVERY)  # nothing of this test's tasks buffered before it
        task_id = client.send_task(HOLD, args=[uuid.uuid4().hex, 0, 0], queue="periodic").id
        sent = time.monotonic()
        _read_until(tap, {task_id}, STATES, 20)
        waited = time.monotonic() - sent
    assert tap.states({task_id}) == dict.fromkeys(STATES, 1), tap.events
    # Bounded by the interval, plus a loaded machine's start of the task and reading.
    assert waited < EVENTS_FLUSH_EVERY + 5, waited


@pytest.mark.slow
def test_a_warm_shutdown_publishes_the_last_tasks_events(default_fleet):
    worker = default_fleet.start_worker(include=TASKS, MAILWORKER_QUEUES="periodic")
    client = default_fleet.client()
    broker = redis.Redis.from_url(default_fleet.env["MAILWORKER_BROKER_URL"])
    run = uuid.uuid4().hex
    with event_tap(default_fleet.env["MAILWORKER_BROKER_URL"]) as tap:
        task_id = client.send_task(HOLD, args=[run, 2, 2], queue="periodic").id
        wait_until(lambda: broker.llen(run) == 1, 30, "the task's start")
        assert worker.process is not None
        worker.process.terminate()  # SIGTERM to the main process: Celery's warm shutdown
        try:
            worker.process.wait(30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the worker did not stop after its task:\n{worker.log[-3000:]}")
        _read_until(tap, {task_id}, STATES, 5)
    assert tap.states({task_id}) == dict.fromkeys(STATES, 1), tap.events


@pytest.mark.slow
def test_events_still_reach_flower_after_a_redis_restart(default_fleet, tmp_path):
    """The consumer's flush timer survives the reconnect: a task after it shows all its events."""
    server = RedisServer(free_port(), tmp_path, persistent=True)
    server.start()
    try:
        broker = f"redis://127.0.0.1:{server.port}"
        default_fleet.configure(
            MAILWORKER_BROKER_URL=f"{broker}/0", MAILWORKER_RESULT_BACKEND=f"{broker}/1"
        )
        worker = default_fleet.start_worker(include=TASKS, MAILWORKER_QUEUES="periodic")
        client = default_fleet.client()
        with event_tap(f"{broker}/0") as tap:
            before = client.send_task(HOLD, args=[uuid.uuid4().hex, 0, 0], queue="periodic").id
            _read_until(tap, {before}, STATES, 20)
            assert tap.states({before}) == dict.fromkeys(STATES, 1), tap.events
        server.stop()
        wait_until(lambda: "Connection to broker lost" in worker.log, 10, "the worker to notice")
        server.start()
        wait_until(worker.ping, 60, "the worker to reconnect")
        with event_tap(f"{broker}/0") as tap:
            after = client.send_task(HOLD, args=[uuid.uuid4().hex, 0, 0], queue="periodic").id
            _read_until(tap, {after}, STATES, 30)
            assert tap.states({after}) == dict.fromkeys(STATES, 1), worker.log[-3000:]
    finally:
        server.stop()
