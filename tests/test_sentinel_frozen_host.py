"""A frozen Redis host: its master and its Sentinel stopped (SIGSTOP), as a hung VM or a paused
container. Its kernel still accepts connections and nothing answers them, so only timeouts end a
client's wait (a dead host refuses at once). molecule/fleet's failover phase met this: its
producer hung for minutes after the promotion, in Sentinel discovery through the frozen Sentinel.

A publisher that held a connection to the frozen master must reach the new master within a bound
the settings promise, at the role's settings (the group's Sentinels only declare a master down
after 1 s instead of 30 s, which changes how soon the promotion comes, not what follows it).
"""

from __future__ import annotations

import contextlib
import signal
import time

import pytest
import redis
from celery import Celery
from mailworker.celery_config import build_config
from mailworker.settings import load_settings

from tests.fixtures.sentinel import MASTER_NAME, Node, SentinelGroup
from tests.fixtures.servers import wait_until

pytestmark = pytest.mark.slow

PATIENCE = 180.0  # seconds the test tries to publish after the promotion (bounded loop)


def publisher(env: dict[str, str]) -> Celery:
    app = Celery("mailworker-tests")
    app.conf.update(build_config(load_settings(env)))
    return app


def promoted(group: SentinelGroup, awake: list[Node]) -> bool:
    answers = []
    for node in awake:
        with contextlib.suppress(redis.RedisError):
            address = group.sentinel_client(node).sentinel_get_master_addr_by_name(MASTER_NAME)
            answers.append(int(address[1]) if address else None)
    return answers.count(group.replica.port) >= 2


def publish(app: Celery) -> None:
    app.send_task("tests.sentinel.record", args=["frozen", 0], queue="send", ignore_result=True)


def test_a_publisher_reaches_the_new_master_after_its_host_froze(
    sentinel_group: SentinelGroup, sentinel_env: dict[str, str]
) -> None:
    group = sentinel_group
    app = publisher(sentinel_env)
    publish(app)  # holds a connection to the master, as a long-lived producer does
    frozen = [group.master, group.sentinels[0]]  # the first Sentinel listed, as in the fleet
    for node in frozen:
        assert node.process is not None
        node.process.send_signal(signal.SIGSTOP)
    try:
        frozen_at = time.monotonic()
        wait_until(lambda: promoted(group, group.sentinels[1:]), 60, "the promotion")
        promoted_after = time.monotonic() - frozen_at
        attempts: list[tuple[float, str]] = []
        started = time.monotonic()
        while time.monotonic() - started < PATIENCE:
            attempt = time.monotonic()
            try:
                publish(app)
            except Exception as error:  # a refused publish: the caller is told, then retries
                attempts.append((round(time.monotonic() - attempt, 1), type(error).__name__))
                continue
            attempts.append((round(time.monotonic() - attempt, 1), "accepted"))
            break
        reached_after = time.monotonic() - started
        print(
            f"\npromoted {promoted_after:.1f} s after the freeze; the publisher reached the new "
            f"master {reached_after:.1f} s later; attempts (seconds, outcome): {attempts}"
        )
        assert attempts[-1][1] == "accepted", attempts
    finally:
        for node in frozen:
            if node.process is not None:
                node.process.send_signal(signal.SIGCONT)
