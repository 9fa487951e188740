"""`mailworker config check|table|new-key`."""

from __future__ import annotations

import json
import os
from typing import TextIO

import click
from cryptography.fernet import Fernet

from mailworker.errors import MailworkerError
from mailworker.ops.envfile import parse_env_file
from mailworker.ops.errors import OpsError
from mailworker.settings import effective, load_settings, markdown_table, unknown_variables


@click.group()
def config() -> None:
    """Inspect the MAILWORKER_* settings."""


@config.command()
@click.option(
    "--environments",
    type=click.File("r", encoding="utf-8"),
    default=None,
    help="Check several environments in one run: a JSON object mapping a name (a unit) to the "
    "text of an EnvironmentFile, each read over the current environment (- is standard input); "
    "prints one JSON result per name, never a value, and exits 1 when any fails.",
)
def check(environments: TextIO | None) -> None:
    """Validate the environment and print the effective settings, secrets masked."""
    if environments is not None:
        _check_environments(environments)
        return
    settings = load_settings()
    width = max(len(name) for name, _ in effective(settings))
    for name, value in effective(settings):
        click.echo(f"{name:<{width}}  {value}")
    for name in unknown_variables():
        click.echo(f"warning: {name} is not a mailworker setting (typo?)", err=True)


@config.command()
def table() -> None:
    """Print the settings table (markdown) the README embeds."""
    click.echo(markdown_table(), nl=False)


@config.command("new-key")
def new_key() -> None:
    """Print a new Fernet key for MAILWORKER_ENCRYPTION_KEYS."""
    click.echo(Fernet.generate_key().decode("ascii"))


def _check_environments(source: TextIO) -> None:
    """`config check --environments`: each named environment checked as `config check` would.

    One process for every unit of a host (the deploy checks them all before any host changes),
    instead of one interpreter start per unit. A result holds the error message (which names the
    variable, never its value) and the unknown MAILWORKER_* names; never the settings.
    """
    try:
        named = json.load(source)
    except ValueError as error:
        raise click.ClickException(f"--environments: not JSON ({error.msg})") from None
    if not isinstance(named, dict) or not all(
        isinstance(name, str) and isinstance(text, str) for name, text in named.items()
    ):
        raise click.ClickException(
            "--environments: expected a JSON object of names to EnvironmentFile texts"
        )
    results: dict[str, dict[str, object]] = {}
    for name, text in named.items():
        environ = dict(os.environ)
        error: str | None = None
        try:
            environ.update(parse_env_file(text, source=name))
            load_settings(environ)
        except (MailworkerError, OpsError) as failure:
            error = str(failure)
        results[name] = {"ok": error is None, "error": error, "unknown": unknown_variables(environ)}
    click.echo(json.dumps(results, indent=2))
    if not all(result["ok"] for result in results.values()):
        raise SystemExit(1)
