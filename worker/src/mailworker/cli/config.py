"""`mailworker config check|table|new-key`."""

from __future__ import annotations

import json
import os
from pathlib import Path
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
@click.option(
    "--unit-file",
    "unit_files",
    multiple=True,
    metavar="NAME=PATH",
    help="One more environment to check as --environments does: the EnvironmentFile at PATH, "
    "under NAME (a unit). Repeat it for each unit.",
)
def check(environments: TextIO | None, unit_files: tuple[str, ...]) -> None:
    """Validate the environment and print the effective settings, secrets masked."""
    if environments is not None or unit_files:
        named = _environments_from_json(environments) if environments is not None else {}
        named.update(_environments_from_files(unit_files))
        _check_environments(named)
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


def _environments_from_json(source: TextIO) -> dict[str, str]:
    """`--environments`: the names and EnvironmentFile texts of a JSON object."""
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
    return named


def _environments_from_files(specs: tuple[str, ...]) -> dict[str, str]:
    """`--unit-file NAME=PATH`: each unit's EnvironmentFile, read as its process manager reads
    it (the deploy runs this as root on the host)."""
    named: dict[str, str] = {}
    for spec in specs:
        name, _, path = spec.partition("=")
        if not name or not path:
            raise click.ClickException(f"--unit-file {spec!r}: expected NAME=PATH")
        try:
            named[name] = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            reason = error.strerror if isinstance(error, OSError) else "not UTF-8"
            raise click.ClickException(
                f"--unit-file {name}: cannot read {path} ({reason})"
            ) from None
    return named


def _check_environments(named: dict[str, str]) -> None:
    """Each named environment checked as `config check` would.

    One process for every unit of a host (the deploy checks them all before any host changes),
    instead of one interpreter start per unit. A result holds the error message (which names the
    variable, never its value) and the unknown MAILWORKER_* names; never the settings.
    """
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
