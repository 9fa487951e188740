"""The error and retry policy every task shares.

- Malformed arguments and tenancy mismatches (InvalidTaskArguments, TenantMismatch): rejected at
  once, never retried, logged with the task id and the reason.
- Permanent failures (PermanentError, AuthenticationFailed, other database errors): fail at once.
- An attempt a later one took over (AttemptSuperseded: it froze and came back) ends quietly:
  ledger `superseded`, no result stored (celery's Ignore), since the result is the other's.
- Transient failures (TransientError, database connection errors, the soft time limit): retried
  with exponential backoff and full jitter, MAILWORKER_RETRY_BACKOFF_BASE * 2**retries capped at
  MAILWORKER_RETRY_BACKOFF_MAX, for as long as the task's retry window lasts, counted from its
  FIRST attempt. The window is a setting named by the task class attribute
  `retry_window_setting` (MAILWORKER_RETRY_WINDOW unless the task is declared with, e.g.,
  `@app.task(..., retry_window_setting="send_retry_window")`): time, not a count, because an
  outage lasts minutes whatever the backoff. No retry is scheduled past the window; a failure
  once it is spent ends the task with "gave up after N attempts over T s: <last error>" (ledger
  `failed`, logged as an error). MAILWORKER_MAX_RETRIES is only a backstop above any window.
- The first attempt's time travels in the message header `mailworker_first_attempt` (Unix
  seconds), set on the first retry and copied into every later one (Celery copies a request's
  custom headers into its retry). It is part of the message, so a redelivered message keeps it,
  and it needs no database: the ledger is best effort, and a PostgreSQL outage is one of the
  faults the window has to ride out. A first attempt redelivered before it ever retried has no
  header yet; its earliest task_attempts row stands in for it.
- A retry is queued before the task's message is acknowledged, never after. When queueing it
  fails (Redis full under noeviction, Redis gone) Celery would reject the message without
  requeue, which acknowledges and drops the task; here the message is rejected WITH requeue, so it
  goes back to the head of its queue, or, if Redis refuses that write as well, stays in Redis'
  unacknowledged set, from which Redis delivers it again after the visibility timeout.
- A task whose worker was lost while it ran (task_reject_on_worker_lost delivers it again) runs
  again at most MAILWORKER_MAX_REDELIVERIES times: one that takes its worker down every time (out
  of memory, a crash in a C library) then fails without running (ledger `failed`, logged as an
  error) instead of killing workers forever. The count is the task's task_attempts rows for the
  same retry that never finished, so a redelivery after a failed retry publish is not counted.

Celery's autoretry_for/retry_backoff attributes are read when a task is declared, and declaring
a task must not read the environment, hence this class. Error messages that leave here never
carry SQL parameters or passwords.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from functools import cache
from typing import Any, Final, NoReturn

from celery import Task
from celery.app.task import Context
from celery.exceptions import Ignore, Reject, Retry, SoftTimeLimitExceeded
from celery.signals import worker_process_init
from celery.utils.log import get_task_logger
from celery.utils.time import get_exponential_backoff_interval
from celery.worker.request import Request
from redis.exceptions import ResponseError
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from mailworker.db.engine import forget_engines, task_connection
from mailworker.errors import (
    AttemptSuperseded,
    ConfigurationError,
    InvalidTaskArguments,
    MailworkerError,
    PermanentError,
    TenantMismatch,
    TransientError,
)
from mailworker.settings import Settings, load_settings
from mailworker.tasks import ledger

logger = get_task_logger(__name__)
# For the worker's main process, where no task is running.
requeue_logger = logging.getLogger("mailworker.tasks.requeue")

FIRST_ATTEMPT_HEADER: Final = "mailworker_first_attempt"


@cache
def worker_settings() -> Settings:
    """The settings of this worker process, read once on first use."""
    return load_settings()


@worker_process_init.connect
def _own_connections(**_: Any) -> None:
    # A prefork child must not reuse the sockets of the engine it inherited from its parent.
    forget_engines()


def database_error(error: SQLAlchemyError) -> MailworkerError:
    """A secret-free TransientError (connection trouble) or PermanentError for a DB error."""
    original = getattr(error, "orig", None) or error
    text = str(original).strip()
    reason = text.splitlines()[0] if text else type(original).__name__
    if isinstance(error, PoolTimeout):
        return TransientError(f"database connection pool exhausted: {reason}")
    # OperationalError covers lost connections, restarts, deadlocks and statement timeouts.
    if isinstance(error, OperationalError | InterfaceError) or (
        isinstance(error, DBAPIError) and error.connection_invalidated
    ):
        return TransientError(f"database unavailable: {reason}")
    return PermanentError(f"database error ({type(original).__name__}): {reason}")


class MailRequest(Request):
    """A task message in the worker's main process: putting it back in its queue may fail.

    Celery puts a message back (reject with requeue: a failed retry publish, a killed pool
    process) by a Redis transaction that moves it from the unacknowledged set to its queue. A
    Redis that refuses writes (full under noeviction) aborts that transaction, which leaves the
    message where it was, safe, but the error is not a connection error, so kombu lets it out of
    the worker's event loop and the whole worker stops. Counted with the connection errors, it is
    logged instead, and Redis delivers the message again after the visibility timeout. As after
    a connection error, the worker keeps counting the message against its prefetch until the
    message comes back to it or the worker restarts.
    """

    def reject(self, requeue: bool = False) -> None:
        if not requeue:
            super().reject(requeue=False)
            return
        if not self.acknowledged:
            errors = (*self._connection_errors, ResponseError)
            self._on_reject(requeue_logger, errors, requeue)
            self.acknowledged = True
            self.send_event("task-rejected", requeue=requeue)


class MailTask(Task):
    """Base class of every mailworker task (see the module docstring for the policy)."""

    Request = MailRequest

    # The Settings field holding this task kind's retry window in seconds.
    retry_window_setting: str = "retry_window"

    @property
    def settings(self) -> Settings:
        return worker_settings()

    def retry_window(self, settings: Settings) -> int:
        """Seconds from the first attempt during which a transient failure is retried."""
        try:
            return int(getattr(settings, self.retry_window_setting))
        except AttributeError:
            raise ConfigurationError(
                f"{self.name}: retry_window_setting {self.retry_window_setting!r} is not a setting"
            ) from None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # One PostgreSQL connection for the whole task, the ledger's writes included.
        with task_connection():
            return self._attempt(*args, **kwargs)

    def _attempt(self, *args: Any, **kwargs: Any) -> Any:
        settings = self.settings
        request = self.request
        now = time.time()
        retries = request.retries or 0
        redelivered = bool((request.delivery_info or {}).get("redelivered"))
        attempt = ledger.start(
            settings,
            task_id=request.id or "",
            task_name=self.name,
            retries=retries,
            redelivered=redelivered,
            hostname=request.hostname or "",
            tenant_id=ledger.tenant_hint(args, kwargs),
        )
        history = None
        if redelivered:  # only then can earlier attempts of this message exist
            history = ledger.history(
                settings, task_id=request.id or "", retries=retries, current=attempt
            )
            if history is not None and history.unfinished > settings.max_redeliveries:
                self._fail_redelivered(settings, attempt, history.unfinished)
        first_attempt = first_attempt_time(request, history, now)
        try:
            self._check_signature(args, kwargs)
            result = super().__call__(*args, **kwargs)
        except Retry:  # the task called self.retry() itself
            ledger.finish(settings, attempt, "retrying")
            raise
        except AttemptSuperseded as error:
            logger.warning("task %s stopped: %s", request.id, error)
            ledger.finish(settings, attempt, "superseded", str(error))
            raise Ignore() from None
        except (InvalidTaskArguments, TenantMismatch) as error:
            logger.warning("task %s rejected (not retried): %s", request.id, error)
            ledger.finish(settings, attempt, "rejected", str(error))
            raise
        except (TransientError, SoftTimeLimitExceeded) as error:
            self._retry_or_fail(settings, attempt, error, first_attempt)
        except PermanentError as error:
            logger.error("task %s failed (not retried): %s", request.id, error)
            ledger.finish(settings, attempt, "failed", str(error))
            raise
        except SQLAlchemyError as error:
            converted = database_error(error)
            if isinstance(converted, TransientError):
                self._retry_or_fail(settings, attempt, converted, first_attempt)
            ledger.finish(settings, attempt, "failed", str(converted))
            raise converted from None
        except Exception as error:
            ledger.finish(settings, attempt, "failed", type(error).__name__)
            raise
        ledger.finish(settings, attempt, "succeeded")
        return result

    def _check_signature(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        try:
            inspect.signature(self.run).bind(*args, **kwargs)
        except TypeError as error:
            raise InvalidTaskArguments(f"{self.name}: {error}") from None

    def _fail_redelivered(self, settings: Settings, attempt: Any, lost: int) -> NoReturn:
        times = f"{lost} time{'s' if lost > 1 else ''}"
        error = PermanentError(
            f"{self.name} not run again: its worker was lost {times} while running it (killed, "
            f"e.g. out of memory); MAILWORKER_MAX_REDELIVERIES is {settings.max_redeliveries}"
        )
        logger.error("task %s failed: %s", self.request.id, error)
        ledger.finish(settings, attempt, "failed", str(error))
        raise error

    def _retry_or_fail(
        self, settings: Settings, attempt: Any, error: BaseException, first_attempt: float
    ) -> NoReturn:
        if isinstance(error, SoftTimeLimitExceeded):
            error = TransientError(f"soft time limit of {settings.soft_time_limit} s exceeded")
        request = self.request
        retries = request.retries or 0
        window = self.retry_window(settings)
        elapsed = max(0.0, time.time() - first_attempt)
        left = math.floor(window - elapsed)
        if left < 1 or retries >= settings.max_retries:
            tries = f"{retries + 1} attempt{'s' if retries else ''}"
            spent = TransientError(f"gave up after {tries} over {elapsed:.0f} s: {error}")
            logger.error("task %s failed: %s", request.id, spent)
            ledger.finish(settings, attempt, "failed", str(spent))
            raise spent from None
        countdown = min(
            left,
            get_exponential_backoff_interval(
                factor=settings.retry_backoff_base,
                retries=retries,
                maximum=settings.retry_backoff_max,
                full_jitter=settings.retry_jitter,
            ),
        )
        headers = {**(request.headers or {}), FIRST_ATTEMPT_HEADER: first_attempt}
        try:
            retry = self.retry(
                exc=error,
                countdown=countdown,
                max_retries=settings.max_retries,
                headers=headers,
                # Celery copies the task's `expires` (beat's and the sync fan-out's) into the
                # retry, which the worker would then drop as revoked with nothing recorded:
                # the retry window is the one budget.
                expires=None,
                throw=False,
            )
        except Reject as rejected:  # Celery's answer when the retry could not be published
            reason = _one_line(rejected.reason)
            logger.error(
                "task %s: %s; its retry could not be queued (%s), so the task goes back to "
                "Redis unacknowledged and is delivered again",
                request.id,
                error,
                reason,
            )
            ledger.finish(settings, attempt, "retrying", f"{error}; retry not queued: {reason}")
            raise Reject(reason, requeue=True) from None
        logger.warning(
            "task %s: %s; retry %d in %d s (%d s left of its %d s retry window)",
            request.id,
            error,
            retries + 1,
            countdown,
            left,
            window,
        )
        ledger.finish(settings, attempt, "retrying", str(error))
        raise retry


def first_attempt_time(request: Context, history: ledger.History | None, now: float) -> float:
    """Unix time of the task's first attempt: its header, else the ledger's oldest row, else now."""
    value = (request.headers or {}).get(FIRST_ATTEMPT_HEADER)
    if value is None:
        value = getattr(request, FIRST_ATTEMPT_HEADER, None)
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return min(float(value), now)
    if history is not None and history.first_started_at is not None:
        return min(history.first_started_at.timestamp(), now)
    return now


def _one_line(reason: Any) -> str:
    text = str(reason).strip()
    return text.splitlines()[0] if text else type(reason).__name__
