"""Beat on one or more hosts: one leader schedules, the others stand by, through a lease in Redis.

Every beat runs `LeaseScheduler`. The beat holding the lease (LEASE_KEY in the broker's Redis,
set only when free, expiring after MAILWORKER_BEAT_LEASE seconds) schedules and renews the lease
at the start of every tick, at least once every MAILWORKER_BEAT_MAX_LOOP_INTERVAL. The others
poll: each sleeps until the lease would expire (never longer than one loop), and the first to find
it free takes it. The last run of every schedule entry lives in Redis (STATE_KEY), shared by all
beats, so a new leader carries on from the old one's last run: no schedule file on any host.

Fencing. A leader sends a due task only after claiming the run: one Lua script checks, inside
Redis, that the lease still names this beat's own token and that the entry's last run is still
the one this beat read, and only then writes the new last run. A beat whose lease is gone (it was
stopped, paused or cut off past the lease, the key was deleted or overwritten) cannot claim, so it
cannot send what the new leader sends, however long it stalled; it stops at once and exits
non-zero (LeaseLost), and the process manager restarts it as a standby. A renewal that fails,
finds another owner or cannot reach Redis ends the leader the same way.

What a failover costs (tests/test_beat_failover.py measures it):
- A standby takes the lease at most MAILWORKER_BEAT_LEASE after the leader's last renewal, so
  at most lease + one loop after the leader died. Entries that came due meanwhile run at once,
  once each, however many intervals were missed. A graceful stop releases the lease: a standby
  takes over within one loop.
- Two runs of one entry are always at least its interval apart: every claim starts from the last
  run the previous claim wrote. A run whose claim succeeded but whose message was never sent
  (the leader died between the two, or the broker refused it) is lost; the next run comes one
  interval later. Celery's own scheduler makes the same choice (it advances the time stamp
  before sending) so that a failing send does not repeat forever; the periodic tasks are sweeps
  that the next run catches up.
- The clocks of the beat hosts decide when a run is due (NTP keeps them close); they play no part
  in the fencing, which happens inside Redis. A Redis failover (Sentinel) can lose the last
  writes, the lease and claims among them: then one run may repeat.

Why not celery-redbeat (RedBeatScheduler, `redbeat_lock_key`, `redbeat_lock_timeout`): its lock
is checked once at the start of a tick, while the last-run writes are plain HSETs. Measured with
celery-redbeat 2.4.2 and Celery 5.7 (lock timeout 3 s, loop 1 s, two entries due together): the
leader's first send stalled 6 s (a slow broker, a pause), a standby took the lock and sent both
entries, then the old leader woke and sent the second entry again from its stale copy, 2.1 s after
the new leader had sent it (interval 5 s), before it noticed the lost lock. Its standby also waits
inside Celery's beat_init signal, with no tick and so no heartbeat (a waiting standby and a hung
one look alike), and every standby rewrites the schedule definitions at start-up, before taking
the lock. Fencing each claim closes the first gap, ticking standbys close the second; the whole
is this module, with no extra dependency.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
from celery.beat import ScheduleEntry, Scheduler
from celery.utils.nodenames import host_format

from mailworker.redis_client import redis_from_url
from mailworker.settings import load_settings

LEASE_KEY = "mailworker:beat:lease"
# Hash: entry name -> "<last run, Unix time> <beat name>".
STATE_KEY = "mailworker:beat:last-run"
# + beat name -> "<Unix time of its last tick> <leader|standby>".
HEARTBEAT_PREFIX = "mailworker:beat:heartbeat:"

# Takes the lease if it is free or already this beat's; otherwise says how long it has left.
_ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return -3
end
return redis.call('PTTL', KEYS[1])
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# 1: claimed; -1: the lease is not this beat's; 0: the last run is not the one it read.
_CLAIM = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return -1
end
local last = redis.call('HGET', KEYS[2], ARGV[2])
if (last or '') ~= ARGV[3] then
  return 0
end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[4])
return 1
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
_ACQUIRED = -3  # what _ACQUIRE answers when it took the lease (PTTL never answers -3)
LEADER, STANDBY = "leader", "standby"

logger = logging.getLogger(__name__)


class LeaseLost(Exception):
    """The leading beat cannot prove it still holds the lease: it stops scheduling."""


class LeaseScheduler(Scheduler):
    """Celery's scheduler, scheduling only while it holds the lease (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        settings = load_settings()
        self.beat_name = host_format(settings.beat_name)
        # Unique per process: a restarted beat never mistakes its predecessor's lease for its own.
        self.token = f"{self.beat_name} {os.getpid()} {secrets.token_hex(6)}"
        self.lease_ms = settings.beat_lease * 1000
        self.leading = False
        self._heartbeat_ttl = settings.beat_heartbeat_max_age * 10
        # No call may outlast the lease it is meant to keep.
        self._redis = redis_from_url(
            settings.broker_url, settings, timeout=min(5.0, settings.beat_lease / 2)
        )
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._renew = self._redis.register_script(_RENEW)
        self._claim = self._redis.register_script(_CLAIM)
        self._release = self._redis.register_script(_RELEASE)
        # Each entry's last run as read from or written to STATE_KEY ("" = none yet).
        self._last_runs: dict[str, str] = {}
        super().__init__(*args, **kwargs)

    def tick(self, *args: Any, **kwargs: Any) -> float:
        if not self.leading:
            return self._stand_by()
        self._renew_lease()
        interval: float = super().tick(*args, **kwargs)
        self._write_heartbeat(LEADER)
        return interval

    def reserve(self, entry: ScheduleEntry) -> ScheduleEntry:
        """Claim the run (fenced by the lease) before Celery sends it; see the module docstring."""
        new_entry = next(entry)
        stamp = f"{new_entry.last_run_at.timestamp():.6f}"
        run = f"{stamp} {self.beat_name}"
        try:
            claimed = self._claim(
                keys=[LEASE_KEY, STATE_KEY],
                args=[self.token, entry.name, self._last_runs.get(entry.name, ""), run],
            )
        except redis.RedisError as error:
            raise self._lost(
                f"could not claim the run of {entry.name} ({error}); that run may be lost"
            ) from error
        if claimed == -1:
            raise self._lost(
                f"lost its lease before sending {entry.name} ({self._holder_text()} holds it)"
            )
        if claimed != 1:
            raise self._lost(f"found the last run of {entry.name} changed by another beat")
        self._last_runs[entry.name] = run
        self.schedule[entry.name] = new_entry
        # The claimed time, not the log line's: the claim is a Redis round trip before the send.
        logger.info("beat %s claimed the run of %s at %s", self.beat_name, entry.name, stamp)
        return new_entry

    def close(self) -> None:
        # A graceful stop hands over at once instead of after the lease.
        if self.leading:
            self.leading = False
            try:
                if self._release(keys=[LEASE_KEY], args=[self.token]):
                    logger.info("beat %s released its lease", self.beat_name)
            except redis.RedisError as error:
                logger.warning("beat %s could not release its lease: %s", self.beat_name, error)
        super().close()

    @property
    def info(self) -> str:
        return (
            f"    . lease -> {LEASE_KEY} ({self.lease_ms // 1000} s) as {self.beat_name}\n"
            f"    . last runs -> {STATE_KEY}"
        )

    def _stand_by(self) -> float:
        try:
            answer = self._acquire(keys=[LEASE_KEY], args=[self.token, self.lease_ms])
            if answer == _ACQUIRED:
                self._take_over()
                return 0.0
            self._write_heartbeat(STANDBY)
        except redis.RedisError as error:
            logger.warning("beat %s (standby) cannot use Redis: %s", self.beat_name, error)
            return float(self.max_interval)
        # Wake when the lease would expire: a dead leader is replaced within its lease.
        if answer > 0:
            return min(float(self.max_interval), answer / 1000 + 0.01)
        return float(self.max_interval)

    def _take_over(self) -> None:
        stored = self._redis.hgetall(STATE_KEY)
        self._last_runs = {}
        for name, entry in self.schedule.items():
            raw = stored.get(name.encode())
            if raw is not None:
                self._last_runs[name] = raw.decode()
                entry.last_run_at = last_run_time(self._last_runs[name])
        self._heap = None  # Celery rebuilds its queue of due entries from these last runs
        self.leading = True
        self._write_heartbeat(LEADER)
        logger.info(
            "beat %s holds the lease (%d s) and schedules from now on",
            self.beat_name,
            self.lease_ms // 1000,
        )

    def _renew_lease(self) -> None:
        try:
            renewed = self._renew(keys=[LEASE_KEY], args=[self.token, self.lease_ms])
        except redis.RedisError as error:
            raise self._lost(f"could not renew its lease ({error})") from error
        if not renewed:
            raise self._lost(f"lost its lease ({self._holder_text()} holds it)")

    def _lost(self, why: str) -> LeaseLost:
        self.leading = False
        message = (
            f"beat {self.beat_name} {why}: it stops scheduling now and exits; restarted, it "
            "stands by"
        )
        logger.error("%s", message)
        return LeaseLost(message)

    def _holder_text(self) -> str:
        try:
            holder = lease_holder(self._redis.get(LEASE_KEY))
        except redis.RedisError:
            return "an unknown beat"
        return holder or "no beat"

    def _write_heartbeat(self, role: str) -> None:
        try:
            self._redis.set(
                HEARTBEAT_PREFIX + self.beat_name,
                f"{time.time():.3f} {role}",
                ex=self._heartbeat_ttl,
            )
        except redis.RedisError as error:
            # The stale heartbeat is what makes `mailworker health beat` report the trouble.
            logger.warning("beat %s heartbeat not written: %s", self.beat_name, error)


def last_run_time(run: str) -> datetime:
    return datetime.fromtimestamp(float(run.split(" ", 1)[0]), tz=UTC)


def lease_holder(raw: bytes | str | None) -> str | None:
    """The beat name in a lease value (`<name> <pid> <token>`), None when free."""
    if raw is None:
        return None
    text = raw.decode() if isinstance(raw, bytes) else raw
    return text.split(" ", 1)[0]


@dataclass(frozen=True)
class BeatStatus:
    """What Redis says about one beat, for `mailworker health beat`."""

    name: str
    heartbeat_age: float | None  # None: no heartbeat
    role: str | None
    holder: str | None  # the beat holding the lease, None when it is free
    lease_left: float | None


def read_status(client: redis.Redis, name: str) -> BeatStatus:
    with client.pipeline(transaction=False) as pipe:
        pipe.get(HEARTBEAT_PREFIX + name)
        pipe.get(LEASE_KEY)
        pipe.pttl(LEASE_KEY)
        heartbeat, lease, left_ms = pipe.execute()
    age = role = None
    if heartbeat is not None:
        stamp, _, role = heartbeat.decode().partition(" ")
        age = max(0.0, time.time() - float(stamp))
    holder = lease_holder(lease)
    return BeatStatus(
        name, age, role or None, holder, left_ms / 1000 if holder and left_ms > 0 else None
    )
