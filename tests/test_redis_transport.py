"""mailworker.redis_transport: redis:// URLs get the client-reusing transport, and it still
delivers, acknowledges and restores messages on a real Redis (the redelivery tests cover a killed
worker end to end)."""

import logging
import subprocess
import sys
import time

import kombu
import pytest
from kombu.transport import redis as kombu_redis
from mailworker import (
    celery_app,  # noqa: F401 - importing the app installs the transport
    redis_transport,
)
from mailworker.redis_transport import Channel, Transport

from tests.fixtures.servers import RedisServer, free_port
from tests.fixtures.trickle import TricklingProxy

# The fixture's database 63: no other test uses it.
DB = 63


def test_redis_urls_use_the_transport_and_keep_their_scheme(redis_server):
    with kombu.Connection(f"redis://:secret@127.0.0.1:{redis_server.port}/{DB}") as connection:
        assert isinstance(connection.transport, Transport)
        assert connection.as_uri() == f"redis://:**@127.0.0.1:{redis_server.port}/{DB}"


def test_a_channel_reuses_one_client_until_its_pool_changes(redis_server):
    with kombu.Connection(f"redis://127.0.0.1:{redis_server.port}/{DB}") as connection:
        channel = connection.default_channel
        assert isinstance(channel, Channel)
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second
        channel._after_fork()  # what a prefork child does: drop the inherited pools
        with channel.conn_or_acquire() as after_fork:
            assert after_fork is not first
            assert after_fork.ping()


def test_messages_are_delivered_acknowledged_and_restored(redis_server):
    client = redis_server.client(DB)
    client.flushdb()
    url = f"redis://127.0.0.1:{redis_server.port}/{DB}"
    with kombu.Connection(url) as connection:
        queue = connection.SimpleQueue("transport-test")
        for number in range(20):
            queue.put({"n": number})
        received = []
        for _ in range(20):
            message = queue.get(timeout=5)
            received.append(message.payload["n"])
            message.ack()
        assert sorted(received) == list(range(20))
        assert client.hlen(kombu_redis.Channel.unacked_key) == 0

        queue.put({"n": "unacked"})
        message = queue.get(timeout=5)
        assert client.hlen(kombu_redis.Channel.unacked_key) == 1
        queue.close()
    # Closing the connection with a message unacknowledged puts it back on the queue.
    with kombu.Connection(url) as connection:
        queue = connection.SimpleQueue("transport-test")
        again = queue.get(timeout=5)
        assert again.payload == {"n": "unacked"}
        again.ack()
        queue.close()
    assert client.hlen(kombu_redis.Channel.unacked_key) == 0


def _fresh_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )


def test_a_new_process_that_imports_the_app_first_connects_through_the_transport():
    # What `celery -A mailworker.celery_app ...` and the CLI do: the app (and so install()) first.
    result = _fresh_python(
        "import kombu, mailworker.celery_app\n"
        "from mailworker.redis_transport import Transport\n"
        "for url in ('redis://127.0.0.1:1/0', 'rediss://127.0.0.1:1/0'):\n"
        "    assert kombu.Connection(url).get_transport_cls() is Transport, url\n"
    )
    assert result.returncode == 0, result.stderr


def test_install_fails_loudly_when_kombu_stops_reading_its_alias_table():
    # Stands for a kombu release that resolves aliases from somewhere else than the table
    # mailworker writes to: the process must not run on kombu's own transport unnoticed.
    result = _fresh_python(
        "import kombu.transport, mailworker.redis_transport\n"
        "kombu.transport.TRANSPORT_ALIASES = dict(kombu.transport.TRANSPORT_ALIASES)\n"
        "import mailworker.celery_app\n"
    )
    assert result.returncode != 0
    assert "RuntimeError: kombu resolves redis:// to <class 'kombu.transport.redis.Transport'>" in (
        result.stderr
    ), result.stderr


def test_a_process_that_connected_before_importing_the_app_keeps_working():
    # kombu keeps the class it resolved first; such a process (the CLI's broker-only commands
    # followed by a task command) stays on kombu's own transport and must not fail.
    result = _fresh_python(
        "import kombu\n"
        "kombu.Connection('redis://127.0.0.1:1/0').get_transport_cls()\n"
        "import mailworker.celery_app\n"
        "print(kombu.Connection('redis://127.0.0.1:1/0').get_transport_cls().__module__)\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "kombu.transport.redis"


# --- leases (mailworker.redis_transport) -------------------------------------------------------


def _score(client, tag: str) -> float | None:
    return client.zscore(kombu_redis.Channel.unacked_index_key, tag)


def test_the_holder_renews_its_leases_and_never_brings_back_an_acked_tag(redis_server):
    client = redis_server.client(DB)
    client.flushdb()
    url = f"redis://127.0.0.1:{redis_server.port}/{DB}"
    with kombu.Connection(url) as connection:
        queue = connection.SimpleQueue("lease-test")
        queue.put({"n": 1})
        message = queue.get(timeout=5)
        tag = message.delivery_tag
        assert tag in redis_transport.held_tags()
        client.zadd(kombu_redis.Channel.unacked_index_key, {tag: 1.0})  # an old lease
        before = time.time()
        assert connection.transport.renew_leases(connection.connection) == 1
        assert _score(client, tag) >= before
        message.ack()
        assert tag not in redis_transport.held_tags()
        assert connection.transport.renew_leases(connection.connection) == 0
        assert _score(client, tag) is None  # ZADD XX: an acked tag is not added back
        queue.close()


def test_a_process_that_renews_no_leases_never_sweeps(redis_server):
    # The CLI, a health check's ping or Flower consume through kombu too; kombu would let them
    # put back every message whose lease looks old by their own visibility timeout.
    client = redis_server.client(DB)
    client.flushdb()
    url = f"redis://127.0.0.1:{redis_server.port}/{DB}"
    options = {"visibility_timeout": 1, "unacked_restore_interval": 1}
    with kombu.Connection(url, transport_options=options) as holder:
        queue = holder.SimpleQueue("sweep-test")
        queue.put({"n": "held"})
        held = queue.get(timeout=5)
        client.zadd(kombu_redis.Channel.unacked_index_key, {held.delivery_tag: 1.0})
        with kombu.Connection(url, transport_options=options) as other:
            assert not other.transport.may_restore()
            other_queue = other.SimpleQueue("sweep-test")
            with pytest.raises(other_queue.Empty):
                other_queue.get(timeout=3)  # drain_events sweeps on every idle poll in kombu
            other_queue.close()
        assert client.hlen(kombu_redis.Channel.unacked_key) == 1
        held.ack()
        queue.close()


def test_renewing_with_redis_unreachable_neither_raises_nor_sweeps(tmp_path, caplog):
    server = RedisServer(free_port(), tmp_path)
    server.start()
    try:
        with kombu.Connection(server.url, transport_options={"socket_timeout": 2}) as connection:
            queue = connection.SimpleQueue("unreachable-test")
            queue.put({"n": 1})
            message = queue.get(timeout=5)
            transport = connection.transport
            transport._restore_after = 0.0  # as a worker that has renewed for a while
            server.stop()
            with caplog.at_level(logging.WARNING, logger="mailworker.redis_transport"):
                assert transport.renew_leases(connection.connection) == 0
            assert "could not renew the leases of 1 unacknowledged tasks" in caplog.text
            assert not transport.may_restore()  # waits a visibility timeout once Redis is back
            assert message.delivery_tag in redis_transport.held_tags()
    finally:
        server.stop()
        redis_transport._held.clear()


def test_a_delivery_is_recorded_through_a_new_connection_when_the_pooled_one_hangs(
    redis_server, caplog
):
    """A message BRPOPed from its queue is in Redis only as the unacked entry written next; if
    that write raised, the consumer's reconnect would drop the message for good. Here the pool's
    idle connection hangs (a Redis host frozen before a Sentinel failover; new connections reach
    a live server, as Sentinel's discovery gives them the new master): the entry must still be
    written."""
    client = redis_server.client(DB)
    client.flushdb()
    with TricklingProxy(redis_server.port, interval=1.0) as frozen_host:
        url = f"redis://127.0.0.1:{frozen_host.port}/{DB}"
        with kombu.Connection(url, transport_options={"socket_timeout": 2}) as connection:
            queue = connection.SimpleQueue("append-test")
            queue.put({"n": 1})
            message = queue.get(timeout=5)  # its unacked write left a connection in the pool
            channel = queue.channel
            frozen_host.freeze_open()
            tag = "a-delivery-after-the-failover"
            with caplog.at_level(logging.WARNING, logger="mailworker.redis_transport"):
                channel.qos.append(message, tag)
            assert client.hexists(kombu_redis.Channel.unacked_key, tag)
            assert _score(client, tag) is not None
            assert f"could not record delivered task {tag} as unacknowledged" in caplog.text
            assert tag in redis_transport.held_tags()
    redis_transport._held.clear()


def test_publishes_go_through_new_connections_when_the_pooled_ones_hang(redis_server, caplog):
    """A publisher whose pool holds several connections to a host that froze (the old master,
    before a Sentinel failover; new connections reach a live server): without a reconnect each
    stale connection fails one publish after the socket timeout. The first failure, in the
    routing lookup or in the write, drops them all and the publish goes through."""
    client = redis_server.client(DB)
    client.flushdb()

    def stale_pool(channel: Channel) -> None:
        idle = [channel.pool.get_connection() for _ in range(3)]
        for pooled in idle:
            channel.pool.release(pooled)
        frozen_host.freeze_open()

    with TricklingProxy(redis_server.port, interval=1.0) as frozen_host:
        url = f"redis://127.0.0.1:{frozen_host.port}/{DB}"
        with kombu.Connection(url, transport_options={"socket_timeout": 2}) as connection:
            queue = connection.SimpleQueue("publish-test")
            stale_pool(queue.channel)
            with caplog.at_level(logging.WARNING, logger="mailworker.redis_transport"):
                queue.put({"n": 1})  # its lookup meets a stale connection first
                queue.put({"n": 2})
            assert client.llen("publish-test") == 2
            assert caplog.text.count("reconnecting to try once more") == 1, caplog.text
            assert "could not look up the queues of publish-test" in caplog.text

            caplog.clear()
            stale_pool(queue.channel)
            message = queue.channel.prepare_message("3")
            with caplog.at_level(logging.WARNING, logger="mailworker.redis_transport"):
                queue.channel._put("publish-test", message)
            assert client.llen("publish-test") == 3
            assert "could not publish to publish-test" in caplog.text
