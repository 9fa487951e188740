"""The second host lost (docker pause: no FIN, no RST, as a host that froze or lost its link)
under load, while it leads beat: the first host keeps consuming (every task accepted during the
pause ends while the second host is still frozen, but at most one that Redis had handed to the
frozen worker's pending BRPOP), the tasks the frozen host had taken but not
started run on the first host after the redelivery delay, the ones it was running finish when it
wakes (its database session, which the frozen host's kernel keeps alive, holds their locks), and
each ends once. The first host takes over beat within the lease (MAILWORKER_BEAT_LEASE + one
loop), its periodic tasks keep firing, and no entry fires twice for one schedule slot, even after
the frozen leader wakes up (fencing). How many tasks waited for the frozen host is printed."""

from __future__ import annotations

import itertools
import time

import pytest
from conftest import (
    WORKER_A,
    WORKER_B,
    WORKER_UNITS,
    Load,
    assert_exactly_once,
    beat_claims,
    beat_sends,
    docker,
    host,
    leader,
    pause,
    redelivery_delay,
    setting,
    wait_for,
    workers_answer,
)

pytestmark = [
    pytest.mark.units("celery-beat.service", "celery-worker.service"),
    pytest.mark.timeout(600),
]
# The beat's Redis calls time out after min(5, lease / 2) s (mailworker.beat).
CLAIM_TIMEOUT = 5.0


def test_losing_the_beat_leaders_host_keeps_consuming_and_scheduling_once():
    lease = setting("BEAT_LEASE")
    loop = setting("BEAT_MAX_LOOP_INTERVAL")
    interval = setting("SEND_SWEEP_INTERVAL")
    if leader() != f"celery-beat@{WORKER_B}":
        # A graceful stop releases the lease: the other beat takes it within one loop. Started
        # again only then: a restart raced the standby for the free lease (and could win it).
        host(WORKER_A).run("systemctl stop celery-beat.service")
        try:
            assert wait_for(lambda: leader() == f"celery-beat@{WORKER_B}", lease + 2 * loop), (
                f"{WORKER_B}'s beat did not take the lease {WORKER_A}'s released ({leader()!r})"
            )
        finally:
            host(WORKER_A).run("systemctl start celery-beat.service")
    since = time.time() - 2 * interval
    delay = redelivery_delay()
    load = Load("host-lost", rate=4, count=60, seconds=15)
    time.sleep(4)  # both hosts take tasks
    pause(WORKER_B)
    paused_at = time.time()
    try:
        assert wait_for(lambda: leader() == f"celery-beat@{WORKER_A}", lease + 2 * loop), (
            f"the lease of the frozen host's beat was not taken over ({leader()!r})"
        )
        takeover = round(time.time() - paused_at, 1)
        fired = wait_for(
            lambda: [at for at, _ in beat_sends(WORKER_A, paused_at)],
            lease + loop + interval + 10,
        )
        first_run = round(fired[0] - paused_at, 1) if fired else None
        # Frozen past the redelivery delay: what it had taken runs on the first host meanwhile.
        time.sleep(max(0.0, paused_at + delay + 10 - time.time()))
    finally:
        docker("unpause", WORKER_B)
    resumed_at = time.time()
    print(f"\nbeat: lease taken over after {takeover} s, first run after {first_run} s", flush=True)
    counts = load.counts(wait=delay + 60)
    timeline = counts["timeline"]
    accepted_before = [(at, end) for at, end in timeline if at < paused_at]
    late = [at for at, end in timeline if at >= paused_at and (end is None or end >= resumed_at)]
    held = [at for at, end in accepted_before if end is None or end >= resumed_at]
    print(
        f"host lost: {len(accepted_before)} task(s) accepted before the pause, {len(held)} of"
        f" them ended after the resume (what {WORKER_B} was running);"
        f" {len(timeline) - len(accepted_before)} accepted during the pause, {len(late)} of them"
        f" ended after the resume; frozen {round(resumed_at - paused_at, 1)} s"
        f" (redelivery delay {delay} s)",
        flush=True,
    )
    assert_exactly_once(counts)
    # The one exception: a delivery Redis handed to a frozen worker's pending BRPOP (it sits in
    # that host's socket buffer until it wakes; docs/reliability.md): at most one per worker
    # unit of the frozen host, each consuming through one main process.
    assert len(late) <= len(WORKER_UNITS), (
        f"tasks accepted during the pause waited for the frozen host: {late}"
    )
    # The promise: a standby leads within lease + one loop of the last renewal; what came due
    # meanwhile runs at once, the rest on time. So a run within lease + loop + interval.
    bound = lease + loop + interval
    assert fired, f"no periodic task sent by {WORKER_A} within {bound + 10} s"
    assert first_run is not None
    assert first_run <= bound + 5, f"first run {first_run} s after the pause, above {bound} s"
    time.sleep(2 * loop)  # the woken leader finds its lease gone and stands by, sending nothing
    intervals = {
        "resubmit-due-sends": interval,
        "sync-all-accounts": setting("SYNC_INTERVAL"),
        "cleanup-stale-tasks": setting("CLEANUP_INTERVAL"),
    }
    claimed: dict[str, list[float]] = {}
    for name in (WORKER_A, WORKER_B):
        claims = beat_claims(name, since - interval)
        for at, entry in claims:
            claimed.setdefault(entry, []).append(at)
        # Fencing: every send follows its own claim (a Redis round trip, under 5 s; the log
        # times are whole milliseconds).
        for at, entry in beat_sends(name, since):
            assert any(e == entry and at - CLAIM_TIMEOUT <= c <= at + 0.001 for c, e in claims), (
                f"{name} sent {entry} at {at} without claiming the run"
            )
    for entry, times in claimed.items():
        times.sort()
        gaps = [b - a for a, b in itertools.pairwise(times)]
        # Each claim starts from the last claimed run, so claims are an interval apart at least.
        assert all(gap >= intervals.get(entry, interval) - 0.01 for gap in gaps), (entry, times)
    assert leader() == f"celery-beat@{WORKER_A}"
    assert wait_for(lambda: workers_answer(WORKER_B), 90), (
        f"{WORKER_B}'s workers do not answer 90 s after it woke up: "
        + host(WORKER_B).run("mailworker health worker").stdout
    )
