"""Writing a large message's raw bytes to messages.raw without building it into an SQL statement.

psycopg2 sends parameters inside the statement text, hex-escaped: a 24 MiB message becomes about
100 MiB of client memory while its INSERT is built. COPY ... FROM STDIN streams instead: the
hex text is produced 64 KiB at a time into a temporary table (dropped at commit), and one
UPDATE moves it into the row, inside the caller's transaction.
"""

from __future__ import annotations

import uuid

from sqlalchemy import Connection

_CHUNK = 32 * 1024  # raw bytes per read; 64 KiB of hex text


class _HexRows:
    """A file-like source for COPY's text format: one row, the bytea as \\\\x followed by hex."""

    def __init__(self, raw: bytes) -> None:
        self._raw = memoryview(raw)
        self._position = 0
        self._pending = b"\\\\x"  # COPY text escapes the backslash: the field reads \x...
        self._done = False

    def read(self, _size: int = -1) -> bytes:
        if self._pending:
            chunk, self._pending = self._pending, b""
            return chunk
        if self._position < len(self._raw):
            chunk = self._raw[self._position : self._position + _CHUNK].hex().encode()
            self._position += _CHUNK
            return chunk
        if not self._done:
            self._done = True
            return b"\n"
        return b""


def copy_raw(connection: Connection, message_id: uuid.UUID, raw: bytes) -> None:
    """Set messages.raw of `message_id` to `raw`, streamed through COPY, in the transaction
    open on `connection`."""
    dbapi = connection.connection.driver_connection
    with dbapi.cursor() as cursor:  # type: ignore[union-attr]
        cursor.execute(
            "CREATE TEMPORARY TABLE IF NOT EXISTS mailworker_raw_copy (raw bytea NOT NULL) "
            "ON COMMIT DROP"
        )
        cursor.copy_expert("COPY mailworker_raw_copy (raw) FROM STDIN", _HexRows(raw))
        cursor.execute(
            "UPDATE messages SET raw = copied.raw FROM mailworker_raw_copy AS copied "
            "WHERE messages.id = %s",
            (str(message_id),),
        )
        cursor.execute("DELETE FROM mailworker_raw_copy")
