"""The Celery application: `celery -A mailworker.celery_app worker` works.

Configured only from MAILWORKER_* variables, and lazily: the configuration is read when Celery
first needs it, so importing this module or a task module reads no file, opens no connection
and raises nothing for a bad environment.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from mailworker import redis_transport
from mailworker.celery_config import TASK_MODULES, build_config
from mailworker.progress import ProgressStep
from mailworker.settings import load_settings


def _configuration() -> dict[str, Any]:
    return build_config(load_settings())


def _monitor_configuration() -> dict[str, Any]:
    return build_config(load_settings(), monitor=True)


# redis:// URLs of this process reuse one Redis client per channel (see redis_transport).
redis_transport.install()
app = Celery("mailworker", include=list(TASK_MODULES))
app.add_defaults(_configuration)
# A worker records its progress, so `mailworker health worker` finds one that stopped consuming.
app.steps["consumer"].add(ProgressStep)
# Flower and the health checks: the same app as the monitoring Redis user (mailworker.redis_client).
monitor_app = Celery("mailworker", include=list(TASK_MODULES))
monitor_app.add_defaults(_monitor_configuration)
