"""A controllable workload for the ops command tests, loaded into a real worker with --include.

The application's own tasks finish (or fail) in milliseconds against the test servers; to see a
task *running* (tasks active, task revoke --terminate, unacked counts) the tests need one that
holds a pool process for as long as they say.
"""

import time

from mailworker.celery_app import app


@app.task(name="tests.ops.hold")
def hold(seconds: float) -> float:
    """Occupy a pool process for `seconds` (routed to the default queue, periodic)."""
    time.sleep(seconds)
    return seconds
