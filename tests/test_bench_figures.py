"""The arithmetic of the mail benchmark's summary lines (bench/mail_figures.py); nothing timed."""

from __future__ import annotations

import math

from bench.mail_figures import IdleCapacity, ratio, verdict
from bench.mail_phases import MailPlan, MailResults, PlainSync


def test_ratio_of_shipped_to_the_limit() -> None:
    assert ratio(31.0, 50.0) == 0.62
    assert math.isnan(ratio(31.0, 0.0))
    assert math.isnan(ratio(math.nan, 50.0))


def test_verdict_says_by_how_much() -> None:
    assert verdict(0.62, 0.5) == "met, +24%"
    assert verdict(0.25, 0.5) == "MISSED by 50%"
    assert verdict(math.nan, 0.5) == "n/a"


def test_capacity_extrapolates_only_from_a_run_that_fit() -> None:
    fit = IdleCapacity(mailboxes=6000, synced_within=6000, last_seconds=200.0, interval=300.0)
    assert fit.all_fit
    assert math.isclose(fit.seconds_per_sync, 200.0 / 6000)
    assert fit.extrapolated == 9000
    assert fit.claim == 9000


def test_capacity_of_a_run_that_did_not_fit_is_what_was_synced_in_time() -> None:
    late = IdleCapacity(mailboxes=6000, synced_within=4200, last_seconds=310.0, interval=300.0)
    assert not late.all_fit
    assert late.claim == 4200
    assert late.extrapolated == 4200


def test_capacity_never_claims_less_than_the_measured_run() -> None:
    # 1,000 mailboxes in 299 s extrapolate to 1,003, rounded down to 1,000.
    close = IdleCapacity(mailboxes=1050, synced_within=1050, last_seconds=299.0, interval=300.0)
    assert close.extrapolated == 1000
    assert close.claim == 1050


def test_the_plain_limit_is_never_the_slower_of_two_rounds() -> None:
    plan = MailPlan(1, 1, 1, 1, 1, 1, (), (8, 40))
    results = MailResults(plan)
    # Rates: 40 loops 2000/(4.5 + 0.5) = 400 and 2000/(3.5 + 0.5) = 500; 8 loops 300 and 310.
    runs = ((1, 8, 6.17), (1, 40, 4.5), (2, 8, 5.95), (2, 40, 3.5))
    for round_number, loops, imap_seconds in runs:
        results.sync_plain.append((round_number, PlainSync(loops, 2000, imap_seconds, 0.5)))
    best = results.plain_sync_best()
    assert best is not None
    assert (best.loops, best.imap_seconds) == (40, 3.5)
    results.sync_plain.append((3, PlainSync(40, 2000, 3.9, 0.5)))  # 455: now the median run
    best = results.plain_sync_best()
    assert best is not None
    assert (best.loops, best.imap_seconds) == (40, 3.9)
