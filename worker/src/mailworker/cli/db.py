"""`mailworker db upgrade|current`: the schema, managed by the Alembic migrations in the package."""

from __future__ import annotations

from dataclasses import replace

import click

from mailworker.errors import PermanentError
from mailworker.settings import Settings, load_settings, mask_url

# Alembic and SQLAlchemy are imported inside the commands, so other commands stay quick.


@click.group()
def db() -> None:
    """The PostgreSQL schema."""


def owner_settings() -> Settings:
    """The settings with the schema owner's URL (MAILWORKER_MIGRATION_DATABASE_URL) in place."""
    settings = load_settings()
    return replace(settings, database_url=settings.migration_database_url)


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Target revision.")
def upgrade_command(revision: str) -> None:
    """Create or migrate the schema (idempotent)."""
    from alembic.util.exc import CommandError  # noqa: PLC0415

    from mailworker.db.engine import database_errors  # noqa: PLC0415
    from mailworker.db.migrate import current_revision, upgrade  # noqa: PLC0415

    settings = owner_settings()
    with database_errors(settings):
        try:
            upgrade(settings, revision)
        except CommandError as error:  # an unknown revision, for one
            raise PermanentError(f"alembic: {error}") from None
        now = current_revision(settings)
    click.echo(f"schema at revision {now} ({mask_url(settings.database_url)})")


@db.command()
def current() -> None:
    """Show the schema revision; exit 1 when it is behind the code's."""
    from mailworker.db.engine import database_errors  # noqa: PLC0415
    from mailworker.db.migrate import current_revision, head_revision  # noqa: PLC0415

    settings = owner_settings()
    with database_errors(settings):
        now = current_revision(settings)
    head = head_revision()
    click.echo(f"schema at revision {now or 'none'}, code expects {head}")
    if now != head:
        raise SystemExit(1)
