"""The columns a synced message is stored with, parsed leniently from its raw bytes.

Mail in the wild is malformed; a header that does not parse is stored as its raw text, never a
reason to fail the sync. PostgreSQL text cannot hold NUL, so NULs are dropped. Only the first
MAX_PARSED_BYTES of a message are parsed, which bounds the memory a large message costs.

The email package parses a header again on every lookup, and finding a message's text part
looks its Content-Type up about seven times (the parser itself, get_body, get_content): that was
most of the parse's CPU. The headers that describe the MIME structure are therefore parsed once
per distinct value and kept in a bounded cache; header objects are read-only, so a cached one is
what a fresh parse would give. The headers stored in the row (Subject, From, To, ...) are read
once each and not cached, so no personal data stays in the process after its sync.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from email import policy
from email.headerregistry import BaseHeader, HeaderRegistry
from email.message import EmailMessage, Message
from email.parser import BytesParser
from email.utils import parsedate_to_datetime
from functools import lru_cache

MAX_BODY_TEXT = 1_000_000
# The email package needs about 9x a message's size in memory to parse it (measured: 210 MiB
# for a 24 MiB message). The columns need only the header and the start of the text part, so
# only this much of a message is parsed; the raw column keeps it whole. (A text part that comes
# after 2 MiB of attachments is not found: body_text stays empty.)
MAX_PARSED_BYTES = 2 * 1024 * 1024
# The MIME structure headers cached (lower case), the longest value cached, and how many values.
STRUCTURE_HEADERS = frozenset({"content-type", "content-transfer-encoding", "mime-version"})
CACHED_HEADER_CHARS = 1000
CACHED_HEADERS = 512


@dataclass(frozen=True)
class ParsedMessage:
    message_id: str | None
    subject: str
    sender: str
    recipients: str
    date: datetime | None
    headers: str
    body_text: str


class _Registry(HeaderRegistry):
    """policy.default's header factory, with the MIME structure headers cached (see above),
    and each header class made once: HeaderRegistry builds a new class (type()) for every
    header it parses, which is a third of the cost of a short one."""

    def __init__(self) -> None:
        super().__init__()
        self._classes: dict[type, type] = {}  # at most one per entry of the registry

    def __getitem__(self, name: str) -> type:
        kind = self.registry.get(name.lower(), self.default_class)
        made = self._classes.get(kind)
        if made is None:
            made = self._classes[kind] = super().__getitem__(name)
        return made

    def __call__(self, name: str, value: str) -> BaseHeader:
        if name.lower() in STRUCTURE_HEADERS and len(value) <= CACHED_HEADER_CHARS:
            return _structure_header(name, value)
        return self[name](name, value)


_REGISTRY = _Registry()


@lru_cache(maxsize=CACHED_HEADERS)
def _structure_header(name: str, value: str) -> BaseHeader:
    return _REGISTRY[name](name, value)


# policy.default in every respect but the caches.
PARSE_POLICY = policy.default.clone(header_factory=_REGISTRY)


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
    message = BytesParser(policy=PARSE_POLICY).parsebytes(start)
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
