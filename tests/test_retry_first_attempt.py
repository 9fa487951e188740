"""Where a task's retry window starts: the header its retries carry, else the ledger's oldest
attempt (a first attempt redelivered before it ever retried), else now."""

from datetime import UTC, datetime

from celery.app.task import Context
from mailworker.tasks.base import FIRST_ATTEMPT_HEADER, first_attempt_time
from mailworker.tasks.ledger import History

NOW = 1_800_000_000.0


def request(**headers: object) -> Context:
    """A task request as the worker builds it from a message's headers."""
    return Context({"id": "t", "task": "x", "retries": 0, **headers})


def test_the_header_wins_and_is_read_as_celery_exposes_it():
    assert first_attempt_time(request(**{FIRST_ATTEMPT_HEADER: NOW - 120}), None, NOW) == NOW - 120
    ledger = History(datetime.fromtimestamp(NOW - 30, UTC), 0)
    assert first_attempt_time(request(**{FIRST_ATTEMPT_HEADER: NOW - 120}), ledger, NOW) == (
        NOW - 120
    )


def test_without_a_header_the_oldest_ledger_row_then_now():
    ledger = History(datetime.fromtimestamp(NOW - 30, UTC), 1)
    assert first_attempt_time(request(), ledger, NOW) == NOW - 30
    assert first_attempt_time(request(), History(None, 0), NOW) == NOW
    assert first_attempt_time(request(), None, NOW) == NOW


def test_a_malformed_or_future_header_does_not_stretch_the_window():
    for bad in ("yesterday", True, None, float("nan"), [1]):
        assert first_attempt_time(request(**{FIRST_ATTEMPT_HEADER: bad}), None, NOW) == NOW
    assert first_attempt_time(request(**{FIRST_ATTEMPT_HEADER: NOW + 3600}), None, NOW) == NOW
