"""`mailworker`: the click group and the console-script entry point.

Every command group lives in its own module, named in COMMANDS and imported only when it runs:
the health timers call `mailworker health` every 30 s, and loading Celery, SQLAlchemy and Alembic
for every command would cost each call a second or more.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import click

from mailworker import __version__
from mailworker.errors import MailworkerError

# command name -> "module:attribute" of its click command or group
COMMANDS: dict[str, str] = {
    "config": "mailworker.cli.config:config",
    "db": "mailworker.cli.db:db",
    "account": "mailworker.cli.account:account",
    "mail": "mailworker.cli.mail:mail",
    "health": "mailworker.cli.health:health",
    "run": "mailworker.cli.run:run",
    "worker": "mailworker.cli.worker:worker",
    "tasks": "mailworker.cli.tasks:tasks",
    "task": "mailworker.cli.task:task",
    "queue": "mailworker.cli.queue:queue",
    "clean": "mailworker.cli.clean:clean",
    "flower": "mailworker.cli.flower:flower",
    "metrics": "mailworker.cli.metrics:metrics",
}


class Group(click.Group):
    """Loads each command on first use; turns the application's errors into one line, exit 1."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attribute = target.split(":")
        command: click.Command = getattr(importlib.import_module(module_name), attribute)
        return command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MailworkerError as error:
            raise click.ClickException(str(error)) from None


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mailworker")
@click.option(
    "--env-file",
    "env_files",
    multiple=True,
    type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
    help="Read variables from this file (systemd EnvironmentFile syntax; - is standard input) "
    "before the command; "
    "repeat it: later files win, as a unit's own settings file wins over mailworker.env.",
)
def cli(env_files: tuple[Path, ...]) -> None:
    """Run and operate the mailworker Celery fleet. Settings come from MAILWORKER_* variables."""
    if env_files:
        from mailworker.ops.envfile import load_env_file  # noqa: PLC0415 - only when asked
        from mailworker.ops.errors import OpsError  # noqa: PLC0415

        for path in env_files:
            try:
                load_env_file(path, os.environ, override=True)
            except OpsError as error:
                raise click.ClickException(str(error)) from None


def main() -> None:
    cli(prog_name="mailworker")
