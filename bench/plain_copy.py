"""The database half of the sync limit: one plain COPY of the same rows into PostgreSQL.

The rows are what `sync_mailbox` stores for the messages the plain imaplib loop fetched (the same
columns, the same parsed headers and text, the raw bytes); they are built before the clock
starts, so only COPY and its commit are timed. The table is a copy of `messages` with its
indexes and unique key (CREATE TABLE ... LIKE messages INCLUDING ALL), without foreign keys.
"""

from __future__ import annotations

import csv
import io
import time
import uuid
from collections.abc import Sequence

import psycopg2
from mailworker.services.parsing import parse_message

from bench.mail_accounts import Account
from bench.plain_loops import PlainRow

TABLE = "bench_plain_messages"
COLUMNS = (
    "id", "tenant_id", "account_id", "folder", "uidvalidity", "uid", "message_id", "subject",
    "sender", "recipients", "date", "headers", "body_text", "raw", "size", "flags", "state",
)  # fmt: skip


def _dsn(database_url: str) -> str:
    return database_url.replace("postgresql+psycopg2://", "postgresql://", 1)


def _array(values: Sequence[str]) -> str:
    quoted = (value.replace("\\", "\\\\").replace('"', '\\"') for value in values)
    return "{" + ",".join(f'"{value}"' for value in quoted) + "}"


def _csv(rows: Sequence[PlainRow], accounts: dict[str, Account]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    for row in rows:
        account = accounts[row.address]
        parsed = parse_message(row.raw)
        writer.writerow(
            [
                uuid.uuid4(), account.tenant_id, account.account_id, "INBOX", row.uidvalidity,
                row.uid, parsed.message_id or "", parsed.subject, parsed.sender,
                parsed.recipients, parsed.date.isoformat() if parsed.date else "",
                parsed.headers, parsed.body_text, "\\x" + row.raw.hex(), row.size,
                _array(row.flags), "present",
            ]
        )  # fmt: skip
    return buffer.getvalue().encode()


def copy_rows(database_url: str, rows: Sequence[PlainRow], accounts: list[Account]) -> float:
    """Seconds one COPY of `rows` (and its commit) took, into an emptied copy of `messages`."""
    data = _csv(rows, {account.address: account for account in accounts})
    connection = psycopg2.connect(_dsn(database_url))
    try:
        with connection.cursor() as cursor:
            cursor.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (LIKE messages INCLUDING ALL)")
            cursor.execute(f"TRUNCATE {TABLE}")
        connection.commit()
        start = time.perf_counter()
        with connection.cursor() as cursor:
            # An empty field is NULL only in the nullable columns (message_id, date).
            cursor.copy_expert(
                f"COPY {TABLE} ({', '.join(COLUMNS)}) FROM STDIN WITH (FORMAT csv, "
                "FORCE_NOT_NULL (subject, sender, recipients, headers, body_text), "
                "FORCE_NULL (message_id, date))",
                io.BytesIO(data),
            )
        connection.commit()
        return time.perf_counter() - start
    finally:
        connection.close()
