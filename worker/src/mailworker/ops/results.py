"""Task results as the Redis result backend stores them (`celery-task-meta-<id>` keys).

Results live for result_expires (1 h by default), so "failed" means failed recently.
"""

import uuid
from dataclasses import asdict, dataclass
from typing import Any

from celery import Celery

from mailworker.ops.broker import CONNECTION_ERRORS, describe_failure, result_backend_client
from mailworker.ops.errors import BadInput

SCAN_BATCH = 500


def require_task_id(value: str) -> str:
    """The canonical form of a Celery task id (a UUID), or BadInput naming the problem."""
    try:
        return str(uuid.UUID(value.strip()))
    except ValueError:
        raise BadInput(
            f"malformed task id {value!r}: expected a UUID such as "
            "3f2b8c1e-5d4a-4e7b-9c1d-2a6f8e9b0c7d"
        ) from None


def describe_exception(result: Any) -> str:
    """'Type: message' from the backend's serialized exception (json: exc_type/exc_message)."""
    if isinstance(result, dict) and "exc_type" in result:
        message = result.get("exc_message")
        if isinstance(message, list | tuple):
            message = ", ".join(str(m) for m in message)
        return f"{result['exc_type']}: {message}" if message else str(result["exc_type"])
    return str(result) if result is not None else ""


@dataclass(frozen=True)
class StoredResult:
    """One stored task state, flattened for tables and JSON."""

    id: str
    state: str
    name: str | None
    date_done: str | None
    worker: str | None
    result: str
    traceback: str | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> "StoredResult":
        state = str(meta.get("status"))
        raw = meta.get("result")
        result = describe_exception(raw) if state in {"FAILURE", "RETRY", "REVOKED"} else repr(raw)
        return cls(
            id=str(meta.get("task_id")),
            state=state,
            name=meta.get("name"),
            date_done=str(meta["date_done"]) if meta.get("date_done") else None,
            worker=meta.get("worker"),
            result=result,
            traceback=meta.get("traceback"),
        )


def stored_result(app: Celery, task_id: str) -> StoredResult | None:
    """The backend's record of task_id, or None when it holds none (unknown or expired)."""
    client = result_backend_client(app)
    backend = app.backend
    try:
        raw = client.get(backend.get_key_for_task(task_id))
    except CONNECTION_ERRORS as exc:
        raise describe_failure("result backend", str(app.conf.result_backend), exc) from None
    if raw is None:
        return None
    return StoredResult.from_meta(backend.decode(raw))


def stored_results(app: Celery, states: frozenset[str], limit: int) -> list[StoredResult]:
    """Results in any of `states`, newest first, at most `limit`."""
    client = result_backend_client(app)
    backend = app.backend
    prefix = backend.task_keyprefix
    pattern = (prefix.decode() if isinstance(prefix, bytes) else prefix) + "*"
    found: list[StoredResult] = []
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=pattern, count=SCAN_BATCH):
            batch.append(key)
            if len(batch) >= SCAN_BATCH:
                found += _matching(backend, client.mget(batch), states)
                batch = []
        if batch:
            found += _matching(backend, client.mget(batch), states)
    except CONNECTION_ERRORS as exc:
        raise describe_failure("result backend", str(app.conf.result_backend), exc) from None
    found.sort(key=lambda r: r.date_done or "", reverse=True)
    return found[:limit]


def _matching(
    backend: Any, values: list[bytes | None], states: frozenset[str]
) -> list[StoredResult]:
    matches = []
    for raw in values:
        if raw is None:  # expired between SCAN and MGET
            continue
        meta = backend.decode(raw)
        if meta.get("status") in states:
            matches.append(StoredResult.from_meta(meta))
    return matches
