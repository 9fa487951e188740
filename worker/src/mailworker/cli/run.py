"""`mailworker run worker|beat|flower [--print]`: exec the command launch.build_argv builds."""

from __future__ import annotations

import os
from pathlib import Path

import click

from mailworker.errors import ConfigurationError
from mailworker.launch import SERVICES, build_argv, check_flower_auth, shell_quoted
from mailworker.settings import Settings, load_settings


@click.command()
@click.argument("service", type=click.Choice(SERVICES))
@click.option("--print", "print_only", is_flag=True, help="Show the command, do not run it.")
def run(service: str, print_only: bool) -> None:
    """Run SERVICE in the foreground (what the systemd units start)."""
    settings = load_settings()
    argv = build_argv(service, settings)
    if print_only:
        click.echo(shell_quoted(argv))
        return
    if service == "flower":
        check_flower_auth(os.environ)
    _check_directories(service, settings)
    os.execv(argv[0], argv)  # noqa: S606 - argv is built from validated settings, no shell


def _check_directories(service: str, s: Settings) -> None:
    """A missing state or log directory gives one line here, not a traceback after exec."""
    wanted: list[tuple[str, str]] = []
    if s.log_file and service != "flower":
        wanted.append(("MAILWORKER_LOG_FILE", s.log_file.replace("{service}", service)))
    if service == "flower" and s.flower_persistent:
        wanted.append(("MAILWORKER_FLOWER_DB", s.flower_db))
    for variable, path in wanted:
        directory = Path(path).parent
        if not directory.is_dir():
            raise ConfigurationError(f"{variable}: directory {directory} does not exist")
        if not os.access(directory, os.W_OK):
            raise ConfigurationError(f"{variable}: directory {directory} is not writable")
