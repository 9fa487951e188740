"""`mailworker mail ls`: what sync stored for one account, and the spam verdicts, from PostgreSQL.

Headers only (folder, UID, date, sender, subject, state, verdict): never a body or raw message,
which are the mailbox owner's, not the operator's. The ids it prints are what the delete and
spam tasks take (`mailworker task send mailworker.tasks.delete.delete_messages ...`).
"""

from __future__ import annotations

from typing import Any

import click

from mailworker.cli.output import emit, render_table
from mailworker.errors import ConfigurationError
from mailworker.settings import load_settings

# SQLAlchemy and the models are imported inside the command (see cli/account.py).

COLUMNS = (
    ("id", "ID"),
    ("folder", "FOLDER"),
    ("uid", "UID"),
    ("date", "DATE"),
    ("sender", "FROM"),
    ("verdict", "SPAM"),
    ("state", "STATE"),
    ("subject", "SUBJECT"),
)


@click.group()
def mail() -> None:
    """Messages that sync stored (headers and verdicts only)."""


@mail.command("ls")
@click.option("--account", "address", required=True, help="The mailbox address.")
@click.option("--tenant", "tenant_name", help="The tenant, when several have this address.")
@click.option("--folder", help="Only this folder (INBOX, Junk, ...).")
@click.option(
    "--verdict",
    type=click.Choice(["spam", "ham", "unclassified"]),
    help="Only messages with this spam verdict.",
)
@click.option(
    "--state",
    type=click.Choice(["present", "trashed", "junk", "expunged", "skipped"]),
    help="Only messages in this state (present: still where sync found it).",
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=50,
    show_default=True,
    help="At most this many, newest first.",
)
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
def list_messages(
    *,
    address: str,
    tenant_name: str | None,
    folder: str | None,
    verdict: str | None,
    state: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """List the account's synced messages: id, folder/UID, date, sender, subject, spam verdict."""
    from sqlalchemy import func, select  # noqa: PLC0415

    from mailworker.db.engine import database_errors, session_scope  # noqa: PLC0415
    from mailworker.db.models import MailAccount, Message, Tenant  # noqa: PLC0415

    settings = load_settings()
    accounts = (
        select(MailAccount, Tenant.name)
        .join(Tenant, Tenant.id == MailAccount.tenant_id)
        .where(MailAccount.email == address)
    )
    if tenant_name:
        accounts = accounts.where(Tenant.name == tenant_name)
    columns = (
        Message.id,
        Message.folder,
        Message.uid,
        Message.date,
        Message.sender,
        Message.subject,
        Message.state,
        Message.is_spam,
        Message.spam_score,
        Message.spam_reasons,
    )
    with database_errors(settings), session_scope(settings) as session:
        found = session.execute(accounts).all()
        if not found:
            where = f" in tenant {tenant_name}" if tenant_name else ""
            raise ConfigurationError(f"no account {address}{where} (see `mailworker account list`)")
        if len(found) > 1:
            tenants = ", ".join(sorted(name for _account, name in found))
            raise ConfigurationError(
                f"{address} is an account of several tenants ({tenants}): add --tenant"
            )
        account, tenant = found[0]
        query = select(*columns).where(Message.account_id == account.id)
        if folder:
            query = query.where(Message.folder == folder)
        if verdict == "spam":
            query = query.where(Message.is_spam.is_(True))
        elif verdict == "ham":
            query = query.where(Message.is_spam.is_(False))
        elif verdict == "unclassified":
            query = query.where(Message.is_spam.is_(None))
        if state:
            query = query.where(Message.state == state)
        total = session.scalar(select(func.count()).select_from(query.subquery()))
        rows = [
            _row(item._asdict())
            for item in session.execute(
                query.order_by(Message.date.desc().nulls_last(), Message.uid.desc()).limit(limit)
            )
        ]
        owner = {
            "tenant": tenant,
            "tenant_id": str(account.tenant_id),
            "user_id": str(account.user_id),
            "account_id": str(account.id),
            "email": account.email,
        }
    summary = (
        f"{owner['email']} (tenant {tenant}): {len(rows)} of {total} message(s)\n"
        f"tenant_id={owner['tenant_id']} user_id={owner['user_id']} "
        f"account_id={owner['account_id']}"
    )
    emit(
        as_json,
        {"account": owner, "total": total, "messages": rows},
        summary + "\n" + render_table(rows, COLUMNS, "(none)"),
    )


def _row(item: dict[str, Any]) -> dict[str, Any]:
    if item["is_spam"] is None:
        verdict = "-"
    else:
        verdict = f"{'spam' if item['is_spam'] else 'ham'} {item['spam_score']:.1f}"
    return {
        "id": str(item["id"]),
        "folder": item["folder"],
        "uid": item["uid"],
        "date": item["date"].isoformat(timespec="seconds") if item["date"] else None,
        "sender": item["sender"],
        "subject": item["subject"],
        "state": item["state"],
        "is_spam": item["is_spam"],
        "spam_score": item["spam_score"],
        "spam_reasons": list(item["spam_reasons"] or []),
        "verdict": verdict,
    }
