"""PostgreSQL under load: stopped for 30 s, and cut off from the second host by a firewall rule
(a partition: no FIN, no RST) for longer than the TCP defaults would notice. Nothing accepted is
lost; submissions made while the database was down are refused to the caller (counted apart);
the partitioned host's sessions, and the advisory locks they held, end within the keepalive
bound (postgresql_tcp_keepalives_* and tcp_user_timeout: 90 s)."""

from __future__ import annotations

import time

import pytest
from conftest import (
    DATA,
    WORKER_B,
    Load,
    address_of,
    assert_exactly_once,
    host,
    psql,
    wait_for,
    workers_answer,
)

pytestmark = [
    pytest.mark.units("celery-worker.service", "celery-worker@io.service"),
    # The outage or the keepalive bound, then the retries' recovery and the count.
    pytest.mark.timeout(600),
]
OUTAGE = 30
# postgresql_tcp_user_timeout / keepalives (idle 60 + 3 x 10): a dead peer's session ends by then.
KEEPALIVE_BOUND = 90
# A retry after the outage: the backoff is capped by the outage's own length (full jitter).
RECOVERY = 150


def test_postgresql_stopped_for_30_s_loses_nothing():
    load = Load("postgresql-stop", rate=2, count=40, seconds=20)
    time.sleep(5)
    stopped = host(DATA).run("systemctl stop postgresql.service")
    assert stopped.rc == 0, stopped.stderr
    try:
        time.sleep(OUTAGE)
    finally:
        assert host(DATA).run("systemctl start postgresql.service").rc == 0
    counts = load.counts(wait=RECOVERY)
    assert_exactly_once(counts)


def sessions_of(address: str) -> int:
    return int(psql(f"SELECT count(*) FROM pg_stat_activity WHERE client_addr = '{address}'"))


def advisory_locks_of(address: str) -> int:
    return int(
        psql(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            f"WHERE l.locktype = 'advisory' AND a.client_addr = '{address}'"
        )
    )


def test_a_partition_from_postgresql_ends_its_sessions_and_loses_nothing():
    data, worker = address_of(DATA), address_of(WORKER_B)
    rule = f"ip daddr {data} tcp dport 5432 drop"
    load = Load("partition", rate=2, count=40, seconds=20)
    time.sleep(5)
    assert sessions_of(worker) > 0, f"{WORKER_B} holds no PostgreSQL session to cut"
    cut = host(WORKER_B).run(
        "nft add table inet fleet_partition && "
        "nft add chain inet fleet_partition out '{ type filter hook output priority 0; }' && "
        f"nft add rule inet fleet_partition out {rule}"
    )
    assert cut.rc == 0, cut.stderr
    started = time.monotonic()
    try:
        ended = wait_for(lambda: sessions_of(worker) == 0, KEEPALIVE_BOUND + 30, step=5)
        released_after = round(time.monotonic() - started, 1)
        locks = advisory_locks_of(worker)
    finally:
        host(WORKER_B).run("nft delete table inet fleet_partition")
    print(f"\npartition: {WORKER_B}'s sessions ended after {released_after} s", flush=True)
    assert ended, f"{WORKER_B}'s sessions outlived the partition's {KEEPALIVE_BOUND} s bound"
    assert locks == 0
    counts = load.counts(wait=RECOVERY)
    assert_exactly_once(counts)
    assert wait_for(lambda: workers_answer(WORKER_B), 60)
