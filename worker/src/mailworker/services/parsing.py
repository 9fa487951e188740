"""The columns a synced message is stored with, parsed leniently from its raw bytes.

Mail in the wild is malformed; a header that does not parse is stored as its raw text, never a
reason to fail the sync. PostgreSQL text cannot hold NUL, so NULs are dropped. Only the first
MAX_PARSED_BYTES of a message are parsed, which bounds the memory a large message costs.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from email import policy
from email.message import EmailMessage, Message
from email.parser import BytesParser
from email.utils import parsedate_to_datetime

MAX_BODY_TEXT = 1_000_000
# The email package needs about 9x a message's size in memory to parse it (measured: 210 MiB
# for a 24 MiB message). The columns need only the header and the start of the text part, so
# only this much of a message is parsed; the raw column keeps it whole. (A text part that comes
# after 2 MiB of attachments is not found: body_text stays empty.)
MAX_PARSED_BYTES = 2 * 1024 * 1024


@dataclass(frozen=True)
class ParsedMessage:
    message_id: str | None
    subject: str
    sender: str
    recipients: str
    date: datetime | None
    headers: str
    body_text: str


def _clean(text: str) -> str:
    return text.replace("\x00", "")


def _header(message: Message, name: str) -> str:
    try:
        values = message.get_all(name) or []
        return _clean(", ".join(str(value) for value in values))
    except Exception:  # a malformed header must not stop the sync
        raw = message.get_all(name, failobj=[])  # type: ignore[call-overload]
        return _clean(", ".join(str(getattr(v, "_parse_tree", v)) for v in raw))


def _date(message: Message) -> datetime | None:
    raw = message.get("Date")
    if raw is None:
        return None
    try:
        parsed = parsedate_to_datetime(str(raw))
    except (TypeError, ValueError, IndexError):
        return None
    return parsed if parsed.tzinfo is not None else None


def _body_text(message: EmailMessage) -> str:
    try:
        part = message.get_body(preferencelist=("plain", "html"))
        if part is None:
            return ""
        content = part.get_content()
    except Exception:  # unknown charsets, broken MIME: keep the raw only
        return ""
    return _clean(content if isinstance(content, str) else "")[:MAX_BODY_TEXT]


def parse_message(raw: bytes) -> ParsedMessage:
    start = raw[:MAX_PARSED_BYTES]  # what is parsed: at most 2 MiB, whatever the size
    message = BytesParser(policy=policy.default).parsebytes(start)
    head, _, _ = start.partition(b"\r\n\r\n")
    if head == start:
        head, _, _ = start.partition(b"\n\n")
    message_id = _header(message, "Message-ID").strip() or None
    return ParsedMessage(
        message_id=message_id[:998] if message_id else None,
        subject=_header(message, "Subject"),
        sender=_header(message, "From"),
        recipients=", ".join(filter(None, (_header(message, "To"), _header(message, "Cc")))),
        date=_date(message),
        headers=_clean(head.decode("utf-8", "replace")),
        body_text=_body_text(message),  # type: ignore[arg-type]
    )
