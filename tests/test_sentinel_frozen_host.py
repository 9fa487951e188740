"""A frozen Redis host: its master and its Sentinel stopped (SIGSTOP), as a hung VM or a paused
container. Its kernel still accepts connections and nothing answers them, so only timeouts end a
client's wait (a dead host refuses at once). molecule/fleet's failover phase met this: its
producer hung for minutes after the promotion, in Sentinel discovery through the frozen Sentinel
(redis-py retried each Sentinel 10 times at the socket timeout, and kombu's reconnects lost the
credentials after moving on to the next sentinel:// address).

A publisher and a plain client (beat's lease, the health checks: redis_from_url) that held a
connection to the frozen master must reach the new master within a bound computed from the
shipped settings (the group's Sentinels declare a master down after 1 s instead of 30 s, which
changes how soon the promotion comes, not what follows it). About 50 s: the group, 2 to 3 s to
the promotion, then 30 s (the broker's socket timeout on the held connection) and two Sentinel
timeouts for the publisher; the plain client meanwhile, in parallel.
"""

from __future__ import annotations

import base64
import contextlib
import json
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from celery import Celery
from mailworker.celery_config import build_config
from mailworker.redis_client import redis_from_url
from mailworker.settings import load_settings

from tests.fixtures.sentinel import MASTER_NAME, Node, SentinelGroup
from tests.fixtures.servers import wait_until

pytestmark = pytest.mark.slow

# kombu opened two channels on the way back (its connection's, then the producer's), each with a
# pool and a redis-py Sentinel client of its own that asks the first-listed Sentinel first.
KOMBU_POOLS = 2


def sentinel_attempt(sentinel_kwargs: dict[str, Any]) -> float:
    """The longest one Sentinel can hold a discovery: one attempt, connect then reply."""
    return sentinel_kwargs["socket_connect_timeout"] + sentinel_kwargs["socket_timeout"]


def publisher_bound(config: dict[str, Any], sentinels: int) -> float:
    """From the promotion to an accepted publish: the publish on the held connection fails after
    the broker's socket timeout, then each of kombu's pools discovers the master (at worst asking
    every Sentinel once) and connects to it."""
    transport = config["broker_transport_options"]
    discovery = sentinels * sentinel_attempt(transport["sentinel_kwargs"])
    return transport["socket_timeout"] + KOMBU_POOLS * (
        discovery + transport["socket_connect_timeout"]
    )


def plain_bound(client: redis.Redis, sentinels: int) -> float:
    """The same for a redis_from_url client: its command on the held connection times out, then
    one discovery and a connect on its own timeouts."""
    pool = client.connection_pool
    sentinel_kwargs = pool.sentinel_manager.sentinel_kwargs
    master = pool.connection_kwargs
    return (
        master["socket_timeout"]
        + sentinels * sentinel_attempt(sentinel_kwargs)
        + master["socket_connect_timeout"]
    )


def promoted(group: SentinelGroup, awake: list[Node]) -> bool:
    answers = []
    for node in awake:
        with contextlib.suppress(redis.RedisError):
            address = group.sentinel_client(node).sentinel_get_master_addr_by_name(MASTER_NAME)
            answers.append(int(address[1]) if address else None)
    return answers.count(group.replica.port) >= 2


def publish(app: Celery, number: int) -> None:
    app.send_task(
        "tests.sentinel.record", args=["frozen", number], queue="send", ignore_result=True
    )


class Trying(threading.Thread):
    """Calls `call` until it returns (or `bound` seconds passed), noting each attempt."""

    def __init__(self, call: Callable[[], object], bound: float) -> None:
        super().__init__(daemon=True)  # one blocked past the bound must not hold pytest's exit
        self.call, self.bound = call, bound
        self.attempts: list[tuple[float, str]] = []
        self.reached_after: float | None = None

    def run(self) -> None:
        started = time.monotonic()
        while self.reached_after is None and time.monotonic() - started < self.bound:
            attempt = time.monotonic()
            try:
                self.call()
            except Exception as error:  # refused: the caller is told, then tries again
                outcome = type(error).__name__
            else:
                outcome = "accepted"
                self.reached_after = time.monotonic() - started
            self.attempts.append((round(time.monotonic() - attempt, 1), outcome))

    def describe(self) -> str:
        reached = "not reached" if self.reached_after is None else f"{self.reached_after:.1f} s"
        blocked = ", one still blocked" if self.is_alive() else ""
        return f"{reached}, attempts (seconds, outcome) {self.attempts}{blocked}"


def published_numbers(client: redis.Redis) -> list[int]:
    messages = [json.loads(raw) for raw in client.lrange("send", 0, -1)]
    return [json.loads(base64.b64decode(m["body"]))[0][1] for m in messages]


def test_a_publisher_and_a_plain_client_reach_the_new_master_after_its_host_froze(
    sentinel_group: SentinelGroup, sentinel_env: dict[str, str]
) -> None:
    group = sentinel_group
    settings = load_settings(sentinel_env)
    config = build_config(settings)
    sentinels = len(settings.redis_sentinels)
    app = Celery("mailworker-tests")
    app.conf.update(config)
    # Both hold a connection to the master, as a long-lived producer and beat's lease do.
    publish(app, 0)
    plain = redis_from_url(settings.broker_url, settings)
    plain.set("tests:frozen", "before")
    bounds = {
        "publisher": publisher_bound(config, sentinels),
        "plain": plain_bound(plain, sentinels),
    }
    frozen = [group.master, group.sentinels[0]]  # the first Sentinel listed, as in the fleet
    for node in frozen:
        assert node.process is not None
        node.process.send_signal(signal.SIGSTOP)
    try:
        frozen_at = time.monotonic()
        wait_until(lambda: promoted(group, group.sentinels[1:]), 60, "the promotion")
        promoted_after = time.monotonic() - frozen_at
        clients = {
            "publisher": Trying(lambda: publish(app, 1), bounds["publisher"]),
            "plain": Trying(lambda: plain.set("tests:frozen", "after"), bounds["plain"]),
        }
        started = time.monotonic()
        for client in clients.values():
            client.start()
        for name, client in clients.items():
            client.join(max(0.0, bounds[name] - (time.monotonic() - started)))
        report = "; ".join(
            f"{name} (bound {bounds[name]:g} s): {client.describe()}"
            for name, client in clients.items()
        )
        print(f"\npromoted {promoted_after:.1f} s after the freeze; {report}")
        for name, client in clients.items():
            assert client.reached_after is not None, report
            assert client.reached_after <= bounds[name], report
        new_master = group.client(group.replica)
        assert 1 in published_numbers(new_master)
        assert new_master.get("tests:frozen") == b"after"
    finally:
        for node in frozen:
            if node.process is not None:
                node.process.send_signal(signal.SIGCONT)
