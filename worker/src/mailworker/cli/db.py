"""`mailworker db upgrade|current`: the schema, managed by the Alembic migrations in the package."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from mailworker.errors import TransientError
from mailworker.settings import load_settings, mask_url

if TYPE_CHECKING:
    from sqlalchemy.exc import SQLAlchemyError

# Alembic and SQLAlchemy are imported inside the commands, so other commands stay quick.


@click.group()
def db() -> None:
    """The PostgreSQL schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Target revision.")
def upgrade_command(revision: str) -> None:
    """Create or migrate the schema (idempotent)."""
    from sqlalchemy.exc import SQLAlchemyError  # noqa: PLC0415

    from mailworker.db.migrate import current_revision, upgrade  # noqa: PLC0415

    settings = load_settings()
    try:
        upgrade(settings, revision)
        now = current_revision(settings)
    except SQLAlchemyError as error:
        raise _unreachable(settings.database_url, error) from None
    click.echo(f"schema at revision {now} ({mask_url(settings.database_url)})")


@db.command()
def current() -> None:
    """Show the schema revision; exit 1 when it is behind the code's."""
    from sqlalchemy.exc import SQLAlchemyError  # noqa: PLC0415

    from mailworker.db.migrate import current_revision, head_revision  # noqa: PLC0415

    settings = load_settings()
    try:
        now = current_revision(settings)
    except SQLAlchemyError as error:
        raise _unreachable(settings.database_url, error) from None
    head = head_revision()
    click.echo(f"schema at revision {now or 'none'}, code expects {head}")
    if now != head:
        raise SystemExit(1)


def _unreachable(url: str, error: SQLAlchemyError) -> TransientError:
    original = getattr(error, "orig", None) or error
    lines = str(original).strip().splitlines()
    reason = lines[0] if lines else type(original).__name__
    return TransientError(f"database {mask_url(url)}: {reason}")
