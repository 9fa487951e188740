"""`python -m mailworker.worker_command [OPTIONS]`: Celery's own `worker` command for this app,
started without the `celery` umbrella command.

`celery worker` first imports every sub-command and every plugin installed beside it: click-repl
with prompt_toolkit, and Flower with Tornado and prometheus_client (the hosts' virtualenv holds
Flower too). That is about 15 MiB in every worker process, inherited by every prefork child, and
none of it is used by a worker. The options are exactly Celery's (`celery worker --help`).
"""

from __future__ import annotations

import sys

from celery.bin.base import CLIContext
from celery.bin.worker import worker


def main(argv: list[str] | None = None) -> None:
    from mailworker.celery_app import app  # noqa: PLC0415 - after the command module, like celery

    context = CLIContext(app=app, no_color=not sys.stdout.isatty(), workdir=None)
    worker.main(
        args=sys.argv[1:] if argv is None else argv,
        prog_name="mailworker worker",
        obj=context,
    )


if __name__ == "__main__":
    main()
