"""The arithmetic of the mail benchmark's summary lines (bench/mail_figures.py); nothing timed."""

from __future__ import annotations

import math

import pytest

from bench.mail_drain import Drain
from bench.mail_figures import CpuBudget, IdleCapacity, ratio, verdict
from bench.mail_phases import MailPlan, MailResults, PlainSend, PlainSync
from bench.mail_report import cpu_budget, section
from bench.plain_loops import PlainRun


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


def test_cpu_budget_bounds_the_rate_by_the_cores() -> None:
    budget = CpuBudget(2, {"workers": 10.0, "dovecot": 8.0, "postgres": 2.0})
    assert budget.total_ms == 20.0
    assert budget.rate_allowed() == 100.0  # 2 cores x 1000 ms / 20 ms per mail
    assert budget.rate_allowed("dovecot", "postgres") == 200.0
    assert budget.ms_allowed(250.0) == 8.0
    assert math.isnan(budget.ms_allowed(0.0))
    assert math.isnan(CpuBudget(2, {"workers": math.nan}).rate_allowed())


def _send_results() -> MailResults:
    results = MailResults(MailPlan(1, 1, 1, 1, 1, 1, (), (40,)), shipped_concurrency=40)
    for round_number, concurrency, seconds in ((1, 40, 10.0), (2, 40, 12.0), (1, 4, 20.0)):
        drain = Drain("send", concurrency, finished=800, items=800, span_seconds=seconds)
        # workers 10 and 11, Dovecot 8, PostgreSQL 2 ms per mail; the other concurrency dearer.
        scale = 1.0 if concurrency == 40 else 3.0
        workers = (8.0 if round_number == 1 else 8.8) * scale
        drain.cpu_seconds = {"workers": workers, "dovecot": 6.4 * scale, "postgres": 1.6 * scale}
        results.send.append((round_number, drain))
    results.send_plain.append((1, PlainSend("reused connection", PlainRun(40, 1, 800, 1.6))))
    return results


def test_cpu_budget_of_a_run_is_over_the_rounds_at_the_shipped_concurrency() -> None:
    budget = cpu_budget(_send_results(), "send")
    assert budget is not None
    assert budget.per_item_ms == pytest.approx({"workers": 10.5, "dovecot": 8.0, "postgres": 2.0})
    assert cpu_budget(MailResults(MailPlan(1, 1, 1, 1, 1, 1, (), (40,))), "send") is None


def test_the_send_section_says_what_the_cpu_per_mail_allows() -> None:
    lines = section(_send_results(), "plot.png")
    budget = next(line for line in lines if line.startswith("CPU per mail"))
    cores = budget.split("On this machine's ")[1].split(" cores")[0]
    assert f"{int(cores) * 1000 / 20.5:,.1f} mails/s (measured: 73.3)" in budget
    assert "workers 10.50, Dovecot 8.00, PostgreSQL 2.00 ms, 20.50 together" in budget
    # 0.5 of the plain loop's 500 mails/s
    assert f"(250.0 mails/s), leaves every process together {int(cores) * 4:.2f} ms" in budget
