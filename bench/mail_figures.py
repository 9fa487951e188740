"""The arithmetic behind the mail summary lines: ratios, verdicts and the idle capacity."""

from __future__ import annotations

import math
from dataclasses import dataclass

# Targets of issue 12 (2 cores, everything on one machine).
SYNC_RATIO_TARGET = 0.5
SEND_RATIO_TARGET = 0.5
IDLE_MAILBOXES_TARGET = 5000
CAPACITY_STEP = 100  # the capacity is claimed in whole hundreds, rounded down


def ratio(shipped: float, limit: float) -> float:
    """shipped / limit; NaN when either is unknown or the limit is zero."""
    if math.isnan(shipped) or math.isnan(limit) or limit <= 0:
        return math.nan
    return shipped / limit


def verdict(value: float, target: float) -> str:
    """ "met", or "MISSED", with how far from the target, for a higher-is-better figure."""
    if math.isnan(value) or target <= 0:
        return "n/a"
    margin = (value - target) / target
    if value >= target:
        return f"met, {margin:+.0%}"
    return f"MISSED by {-margin:.0%}"


@dataclass(frozen=True)
class IdleCapacity:
    """How many idle mailboxes one worker host keeps in sync, from one measured fan-out."""

    mailboxes: int  # registered and active: what the fan-out queued
    synced_within: int  # synced no later than `interval` after the fan-out began
    last_seconds: float  # from the fan-out's start to the last sync's end
    interval: float

    @property
    def all_fit(self) -> bool:
        return self.synced_within >= self.mailboxes and self.last_seconds <= self.interval

    @property
    def seconds_per_sync(self) -> float:
        """Wall time one idle sync costs at the shipped concurrency (the run's average)."""
        if not self.synced_within or math.isnan(self.last_seconds):
            return math.nan
        if self.all_fit:
            return self.last_seconds / self.mailboxes
        return self.interval / self.synced_within

    @property
    def extrapolated(self) -> int:
        """interval / seconds_per_sync, in whole hundreds (rounded down)."""
        cost = self.seconds_per_sync
        if math.isnan(cost) or cost <= 0:
            return 0
        return int(self.interval / cost) // CAPACITY_STEP * CAPACITY_STEP

    @property
    def claim(self) -> int:
        """The figure reported: the extrapolation when every measured mailbox fit (never less
        than what was measured), else how many were synced within the interval."""
        if self.all_fit:
            return max(self.mailboxes, self.extrapolated)
        return self.synced_within


@dataclass(frozen=True)
class CpuBudget:
    """What the CPU a shipped run spent per item (message stored, mail sent) allows on the
    machine's cores, every process sharing them: an upper bound on the rate, whatever else
    limits it. Parts not measured (the SMTP server, Redis, the harness) only lower it."""

    cores: int
    per_item_ms: dict[str, float]  # part -> CPU ms per item, e.g. {"workers": 10.5, ...}

    @property
    def total_ms(self) -> float:
        return sum(self.per_item_ms.values())

    def rate_allowed(self, *parts: str) -> float:
        """Items per second the cores allow at the CPU per item of `parts` (all if none)."""
        spent = sum(self.per_item_ms[part] for part in parts) if parts else self.total_ms
        if math.isnan(spent) or spent <= 0:
            return math.nan
        return self.cores * 1000 / spent

    def ms_allowed(self, rate: float) -> float:
        """CPU ms per item, all processes together, that a rate of `rate` items/s leaves."""
        if math.isnan(rate) or rate <= 0:
            return math.nan
        return self.cores * 1000 / rate
