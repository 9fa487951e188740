"""Producer process: sends bench tasks through a given Celery app, as fast as it can or at a rate.

Runs in its own process so the harness's timing loop and the producer do not share a GIL, and so
each configuration produces through its own app (its own serializer, publish and retry settings).
Prints one JSON line: {"sent": N, "seconds": S}.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time

from celery import Celery

from bench.tasks import IO_WAIT_TASK


def load_app(spec: str) -> Celery:
    module_name, _, attribute = spec.partition(":")
    app = getattr(importlib.import_module(module_name), attribute or "app")
    if not isinstance(app, Celery):
        raise SystemExit(f"{spec} is not a Celery app")
    return app


def produce(
    app: Celery, task: str, queue: str, *, count: int, rate: float, io_seconds: float
) -> float:
    """Send `count` tasks (`rate` per second, 0 = as fast as possible); return the seconds taken."""
    interval = 1.0 / rate if rate > 0 else 0.0
    with app.producer_or_acquire() as producer:
        start = time.perf_counter()
        for index in range(count):
            if interval:
                delay = start + index * interval - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            sent = time.time()
            args = [sent, io_seconds] if task == IO_WAIT_TASK else [sent]
            app.send_task(task, args=args, queue=queue, producer=producer)
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.produce")
    parser.add_argument("--app", required=True, help="module:attribute of the Celery app")
    parser.add_argument("--task", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--rate", type=float, default=0.0, help="tasks per second, 0 = flat out")
    parser.add_argument("--io-seconds", type=float, default=0.05)
    options = parser.parse_args(argv)
    app = load_app(options.app)
    seconds = produce(
        app,
        options.task,
        options.queue,
        count=options.count,
        rate=options.rate,
        io_seconds=options.io_seconds,
    )
    json.dump({"sent": options.count, "seconds": seconds}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
