"""The bench's own tasks, imported by both the baseline and the shipped worker.

Each task appends one line `sent started finished` (Unix times) to a per-process file in
BENCH_RECORD_DIR. A local append costs a few microseconds and touches no broker, so it does not
distort what is measured. `worker_ready` touches a file so the harness knows when a worker consumes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from celery import shared_task
from celery.signals import worker_ready

RECORD_DIR_ENV = "BENCH_RECORD_DIR"
NOOP_TASK = "bench.noop"
IO_WAIT_TASK = "bench.io_wait"

_record_fds: dict[int, int] = {}


def _record_fd() -> int:
    # One O_APPEND descriptor per process: prefork children must not share the parent's.
    pid = os.getpid()
    fd = _record_fds.get(pid)
    if fd is None:
        path = Path(os.environ[RECORD_DIR_ENV]) / f"tasks-{pid}.log"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        _record_fds[pid] = fd
    return fd


def _record(sent: float, started: float) -> None:
    # A single write of a short line to an O_APPEND file is atomic, so pool threads may share it.
    os.write(_record_fd(), f"{sent!r} {started!r} {time.time()!r}\n".encode())


@shared_task(name=NOOP_TASK)
def noop(sent: float) -> None:
    """Do nothing: measures the per-task overhead of the worker and the broker."""
    _record(sent, time.time())


@shared_task(name=IO_WAIT_TASK)
def io_wait(sent: float, seconds: float) -> None:
    """Wait like an SMTP or IMAP round trip: measures how many waits a node overlaps."""
    started = time.time()
    time.sleep(seconds)
    _record(sent, started)


@worker_ready.connect
def _mark_ready(**_: Any) -> None:
    directory = os.environ.get(RECORD_DIR_ENV)
    if directory:
        (Path(directory) / f"ready-{os.getpid()}").touch()
