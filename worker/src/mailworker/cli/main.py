"""`mailworker`: the click group and the console-script entry point.

Every command group lives in its own module and is added here with `cli.add_command(...)`.
"""

from __future__ import annotations

from typing import Any

import click

from mailworker import __version__
from mailworker.cli.account import account
from mailworker.cli.clean import clean
from mailworker.cli.config import config
from mailworker.cli.db import db
from mailworker.cli.flower import flower
from mailworker.cli.health import health
from mailworker.cli.queue import queue
from mailworker.cli.run import run
from mailworker.cli.task import task
from mailworker.cli.tasks import tasks
from mailworker.cli.worker import worker
from mailworker.errors import MailworkerError


class Group(click.Group):
    """Turns the application's own errors into one line on stderr and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MailworkerError as error:
            raise click.ClickException(str(error)) from None


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mailworker")
def cli() -> None:
    """Run and operate the mailworker Celery fleet. Settings come from MAILWORKER_* variables."""


cli.add_command(config)
cli.add_command(db)
cli.add_command(account)
cli.add_command(health)
cli.add_command(run)
cli.add_command(worker)
cli.add_command(tasks)
cli.add_command(task)
cli.add_command(queue)
cli.add_command(clean)
cli.add_command(flower)


def main() -> None:
    cli(prog_name="mailworker")
