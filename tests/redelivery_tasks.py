"""A task that takes its own pool process down, loaded into a real worker with --include.

It stands for a task that is killed every time it runs (out of memory on a huge message): with
task_reject_on_worker_lost, Redis delivers it again after each kill, so only MailTask's bound on
redeliveries stops it.
"""

import os
import signal

from mailworker.celery_app import app
from mailworker.tasks.base import MailTask


@app.task(base=MailTask, bind=True, name="tests.redelivery.kill_own_process")
def kill_own_process(self: MailTask) -> None:
    """SIGKILL the pool process running this task, as the kernel's OOM killer would."""
    os.kill(os.getpid(), signal.SIGKILL)
