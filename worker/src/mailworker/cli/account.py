"""`mailworker account add|list|rotate-keys`: register mailboxes without writing SQL.

The mail password is read from stdin (--password-stdin) or a hidden prompt, never from an
argument (arguments show up in `ps` and shell history), and is stored only encrypted.
"""

from __future__ import annotations

import json
import sys

import click

from mailworker.errors import ConfigurationError
from mailworker.mail.endpoints import SECURITY_MODES
from mailworker.settings import load_settings

# SQLAlchemy and the models are imported inside the commands: every `mailworker` call (the
# health timers run one every few seconds) would pay for them otherwise.

SECURITY = click.Choice(SECURITY_MODES)


@click.group()
def account() -> None:
    """Mail accounts of tenants' users."""


@account.command()
@click.option("--tenant", "tenant_name", required=True, help="Tenant name (created if missing).")
@click.option("--user", "user_email", required=True, help="User's email (created if missing).")
@click.option("--email", help="The mailbox address (default: the user's email).")
@click.option("--username", help="Login name on the mail servers (default: the mailbox address).")
@click.option("--imap-host", required=True)
@click.option("--imap-port", type=click.IntRange(1, 65535), default=993, show_default=True)
@click.option("--imap-security", type=SECURITY, default="ssl", show_default=True)
@click.option("--smtp-host", required=True)
@click.option("--smtp-port", type=click.IntRange(1, 65535), default=587, show_default=True)
@click.option("--smtp-security", type=SECURITY, default="starttls", show_default=True)
@click.option(
    "--smtp-username", help="SMTP login, when the SMTP server wants other credentials (a relay)."
)
@click.option(
    "--password-stdin",
    is_flag=True,
    help="Read the mailbox password from stdin (line 1) and, with --smtp-username, "
    "the SMTP password (line 2).",
)
def add(
    *,
    tenant_name: str,
    user_email: str,
    email: str | None,
    username: str | None,
    imap_host: str,
    imap_port: int,
    imap_security: str,
    smtp_host: str,
    smtp_port: int,
    smtp_security: str,
    smtp_username: str | None,
    password_stdin: bool,
) -> None:
    """Register a mailbox; prints tenant_id, user_id and account_id."""
    from sqlalchemy import select  # noqa: PLC0415

    from mailworker.crypto import encrypt_password  # noqa: PLC0415
    from mailworker.db.engine import database_errors, session_scope  # noqa: PLC0415
    from mailworker.db.models import MailAccount, Tenant, User  # noqa: PLC0415

    settings = load_settings()
    password = _read_password(password_stdin, "Mailbox password")
    smtp_password = _read_password(password_stdin, "SMTP password") if smtp_username else None
    address = email or user_email
    with database_errors(settings), session_scope(settings) as session:
        tenant = session.scalar(select(Tenant).where(Tenant.name == tenant_name))
        if tenant is None:
            tenant = Tenant(name=tenant_name, active=True)
            session.add(tenant)
            session.flush()
        user = session.scalar(
            select(User).where(User.tenant_id == tenant.id, User.email == user_email)
        )
        if user is None:
            user = User(tenant_id=tenant.id, email=user_email, active=True)
            session.add(user)
            session.flush()
        taken = session.scalar(
            select(MailAccount.id).where(
                MailAccount.tenant_id == tenant.id, MailAccount.email == address
            )
        )
        if taken is not None:
            raise ConfigurationError(f"tenant {tenant_name} already has an account for {address}")
        mail_account = MailAccount(
            tenant_id=tenant.id,
            user_id=user.id,
            email=address,
            username=username or address,
            password_encrypted=encrypt_password(settings, password),
            imap_host=imap_host,
            imap_port=imap_port,
            imap_security=imap_security,
            smtp_host=smtp_host,
            smtp_port=smtp_port,
            smtp_security=smtp_security,
            smtp_username=smtp_username,
            smtp_password_encrypted=(
                encrypt_password(settings, smtp_password) if smtp_password else None
            ),
            active=True,
        )
        session.add(mail_account)
        session.flush()
        ids = (tenant.id, user.id, mail_account.id)
    click.echo(f"tenant_id={ids[0]}\nuser_id={ids[1]}\naccount_id={ids[2]}")


def _read_password(from_stdin: bool, what: str) -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt(what, hide_input=True, confirmation_prompt=True)
    if not password:
        raise ConfigurationError(f"the {what.lower()} must not be empty")
    return password


@account.command("list")
@click.option("--tenant", "tenant_name", help="Only this tenant's accounts.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines instead of a table.")
def list_accounts(tenant_name: str | None, as_json: bool) -> None:
    """List accounts (never their passwords)."""
    from sqlalchemy import select  # noqa: PLC0415

    from mailworker.db.engine import database_errors, session_scope  # noqa: PLC0415
    from mailworker.db.models import MailAccount, Tenant, User  # noqa: PLC0415

    settings = load_settings()
    query = (
        select(MailAccount, Tenant.name, User.email)
        .join(Tenant, Tenant.id == MailAccount.tenant_id)
        .join(User, User.id == MailAccount.user_id)
        .order_by(Tenant.name, MailAccount.email)
    )
    if tenant_name:
        query = query.where(Tenant.name == tenant_name)
    with database_errors(settings), session_scope(settings) as session:
        rows = [
            {
                "tenant": tenant,
                "tenant_id": str(item.tenant_id),
                "user": user,
                "user_id": str(item.user_id),
                "account_id": str(item.id),
                "email": item.email,
                "imap": f"{item.imap_security}://{item.imap_host}:{item.imap_port}",
                "smtp": f"{item.smtp_security}://{item.smtp_host}:{item.smtp_port}",
                "active": item.active,
            }
            for item, tenant, user in session.execute(query).all()
        ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no accounts")
        return
    columns = ("tenant", "email", "account_id", "imap", "smtp", "active")
    widths = {c: max(len(c), *(len(str(row[c])) for row in rows)) for c in columns}
    click.echo("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip())
    for row in rows:
        click.echo("  ".join(str(row[c]).ljust(widths[c]) for c in columns).rstrip())


@account.command("rotate-keys")
def rotate_keys() -> None:
    """Re-encrypt every stored password with the first MAILWORKER_ENCRYPTION_KEYS key.

    Run it after putting a new key first; afterwards the old keys can be removed.
    """
    from sqlalchemy import select  # noqa: PLC0415

    from mailworker.crypto import rotate_token  # noqa: PLC0415
    from mailworker.db.engine import database_errors, session_scope  # noqa: PLC0415
    from mailworker.db.models import MailAccount  # noqa: PLC0415

    settings = load_settings()
    with database_errors(settings), session_scope(settings) as session:
        accounts = session.scalars(select(MailAccount).with_for_update()).all()
        for item in accounts:
            item.password_encrypted = rotate_token(settings, item.password_encrypted)
            if item.smtp_password_encrypted:
                item.smtp_password_encrypted = rotate_token(settings, item.smtp_password_encrypted)
    click.echo(f"re-encrypted {len(accounts)} password(s) with the first key")
