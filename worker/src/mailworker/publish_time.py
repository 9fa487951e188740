"""Stamp every task message with its publish time, so queued work has an age.

Celery's protocol 2 headers carry no publish time (`eta` and `expires` only when set), and
kombu's Redis lists keep none either, so `mailworker metrics serve` could not say how long the
oldest task of a queue has waited. Every app of this project (worker, beat, the CLI, the tests'
producers) is configured by celery_config.build_config, which installs this handler.

A retry is a new publish and gets a new stamp; a message Redis redelivers (restored from the
unacked hash) keeps its first one, so its age counts from its first publish.
"""

from __future__ import annotations

import time
from typing import Any

from celery.signals import before_task_publish

HEADER = "mailworker_published_at"


def _stamp(headers: dict[str, Any] | None = None, **_: Any) -> None:
    if headers is not None:
        headers[HEADER] = round(time.time(), 3)


def install() -> None:
    before_task_publish.connect(_stamp, weak=False, dispatch_uid=HEADER)
