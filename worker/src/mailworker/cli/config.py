"""`mailworker config check|table|new-key`."""

from __future__ import annotations

import click
from cryptography.fernet import Fernet

from mailworker.settings import effective, load_settings, markdown_table, unknown_variables


@click.group()
def config() -> None:
    """Inspect the MAILWORKER_* settings."""


@config.command()
def check() -> None:
    """Validate the environment and print the effective settings, secrets masked."""
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
