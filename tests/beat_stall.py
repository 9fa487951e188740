"""Loaded into a real beat by tests/test_beat_failover.py: its first send stalls for
BEAT_TEST_STALL seconds, as behind a slow broker, a network cut or a paused VM.

This is the shape in which celery-redbeat sends one run twice (see mailworker.beat): the leader
stalls between reading the schedule and sending, longer than its lease.
"""

import os
import time

from celery.signals import before_task_publish

_stalled: list[bool] = []


@before_task_publish.connect
def _stall_first_send(**_: object) -> None:
    if not _stalled:
        _stalled.append(True)
        time.sleep(float(os.environ["BEAT_TEST_STALL"]))
