"""Tasks for the redelivery tests, loaded into a real worker with --include.

kill_own_process stands for a task that is killed every time it runs (out of memory on a huge
message): with task_reject_on_worker_lost, Redis delivers it again after each kill, so only
MailTask's bound on redeliveries stops it. hold and kill_own_process_once record each run in
Redis, so a test sees where and when a task ran and how often.
"""

import json
import os
import signal
import time

import redis
from mailworker.celery_app import app
from mailworker.tasks.base import MailTask


@app.task(base=MailTask, bind=True, name="tests.redelivery.kill_own_process")
def kill_own_process(self: MailTask) -> None:
    """SIGKILL the pool process running this task, as the kernel's OOM killer would."""
    os.kill(os.getpid(), signal.SIGKILL)


def _record_run(task: MailTask, key: str) -> int:
    """Append this run (node, pool process, time) to the list `key` in the broker's Redis; the
    number of runs so far, this one included."""
    client = redis.Redis.from_url(task.app.conf.broker_url)
    run = {
        "node": task.request.hostname,
        "pid": os.getpid(),
        "at": time.time(),
        "redelivered": bool((task.request.delivery_info or {}).get("redelivered")),
    }
    return client.rpush(key, json.dumps(run))


@app.task(base=MailTask, bind=True, name="tests.redelivery.hold")
def hold(self: MailTask, key: str, first: float, later: float) -> int:
    """Record the run, then sleep `first` seconds on the first run and `later` on the others."""
    runs = _record_run(self, key)
    time.sleep(first if runs == 1 else later)
    return runs


@app.task(base=MailTask, bind=True, name="tests.redelivery.kill_own_process_once")
def kill_own_process_once(self: MailTask, key: str) -> int:
    """Record the run; the first one SIGKILLs its own pool process."""
    runs = _record_run(self, key)
    if runs == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return runs
