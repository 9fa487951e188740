"""The error policy every task shares.

- Malformed arguments and tenancy mismatches (InvalidTaskArguments, TenantMismatch): rejected at
  once, never retried, logged with the task id and the reason.
- Transient failures (TransientError, database connection errors, the soft time limit): retried
  with exponential backoff and full jitter, MAILWORKER_RETRY_BACKOFF_BASE * 2**retries capped at
  MAILWORKER_RETRY_BACKOFF_MAX, up to MAILWORKER_MAX_RETRIES times; then the task fails.
- Permanent failures (PermanentError, AuthenticationFailed, other database errors): fail at once.

This is Celery's autoretry_for/retry_backoff/retry_backoff_max/retry_jitter behaviour, done here
because those task attributes are read when a task is declared, and declaring a task must not
read the environment. Error messages that leave here never carry SQL parameters or passwords.
"""

from __future__ import annotations

import inspect
from functools import cache
from typing import Any, NoReturn

from celery import Task
from celery.exceptions import Retry, SoftTimeLimitExceeded
from celery.signals import worker_process_init
from celery.utils.log import get_task_logger
from celery.utils.time import get_exponential_backoff_interval
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from mailworker.db.engine import forget_engines
from mailworker.errors import (
    InvalidTaskArguments,
    MailworkerError,
    PermanentError,
    TenantMismatch,
    TransientError,
)
from mailworker.settings import Settings, load_settings
from mailworker.tasks import ledger

logger = get_task_logger(__name__)


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


class MailTask(Task):
    """Base class of every mailworker task (see the module docstring for the policy)."""

    @property
    def settings(self) -> Settings:
        return worker_settings()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        settings = self.settings
        request = self.request
        attempt = ledger.start(
            settings,
            task_id=request.id or "",
            task_name=self.name,
            retries=request.retries or 0,
            redelivered=bool((request.delivery_info or {}).get("redelivered")),
            hostname=request.hostname or "",
            tenant_id=ledger.tenant_hint(args, kwargs),
        )
        try:
            self._check_signature(args, kwargs)
            result = super().__call__(*args, **kwargs)
        except Retry:
            ledger.finish(settings, attempt, "retrying")
            raise
        except (InvalidTaskArguments, TenantMismatch) as error:
            logger.warning("task %s rejected (not retried): %s", request.id, error)
            ledger.finish(settings, attempt, "rejected", str(error))
            raise
        except (TransientError, SoftTimeLimitExceeded) as error:
            self._retry_or_fail(settings, attempt, error)
        except PermanentError as error:
            logger.error("task %s failed (not retried): %s", request.id, error)
            ledger.finish(settings, attempt, "failed", str(error))
            raise
        except SQLAlchemyError as error:
            converted = database_error(error)
            if isinstance(converted, TransientError):
                self._retry_or_fail(settings, attempt, converted)
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

    def _retry_or_fail(self, settings: Settings, attempt: Any, error: BaseException) -> NoReturn:
        if isinstance(error, SoftTimeLimitExceeded):
            error = TransientError(f"soft time limit of {settings.soft_time_limit} s exceeded")
        retries = self.request.retries or 0
        if retries >= settings.max_retries:
            logger.error("task %s failed after %d retries: %s", self.request.id, retries, error)
            ledger.finish(settings, attempt, "failed", str(error))
            raise error from None
        countdown = get_exponential_backoff_interval(
            factor=settings.retry_backoff_base,
            retries=retries,
            maximum=settings.retry_backoff_max,
            full_jitter=settings.retry_jitter,
        )
        logger.warning(
            "task %s: %s; retry %d of %d in %d s",
            self.request.id,
            error,
            retries + 1,
            settings.max_retries,
            countdown,
        )
        ledger.finish(settings, attempt, "retrying", str(error))
        raise self.retry(exc=error, countdown=countdown, max_retries=settings.max_retries)
