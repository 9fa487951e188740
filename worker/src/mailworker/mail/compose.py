"""Turning a send_email task's message spec into a checked EmailMessage.

The spec is what a client submits to the outbox (services/outbox.py; JSON-able):

    {"to": ["bob@example.org"], "cc": [], "bcc": [], "subject": "Hi", "body": "text",
     "html": "<p>optional</p>", "message_id": "<optional@id>", "reply_to": "optional"}

Every problem raises InvalidTaskArguments naming the field, so nothing is stored or sent.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from email.errors import HeaderParseError
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formatdate, getaddresses, make_msgid
from typing import Any

from mailworker.errors import InvalidTaskArguments

ADDRESS_FIELDS = ("to", "cc", "bcc", "reply_to")
TEXT_FIELDS = ("subject", "body", "html", "message_id")
KNOWN_FIELDS = frozenset(ADDRESS_FIELDS + TEXT_FIELDS)
# RFC 5321 4.5.3.1.8: servers must accept 100 recipients per message, not necessarily more.
MAX_RECIPIENTS = 100
MAX_SUBJECT_LENGTH = 900
# RFC 5322 3.6.4 msg-id, ASCII only: dot-atom-text "@" (dot-atom-text / no-fold-literal).
_ATOM = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+"
_DOT_ATOM = rf"{_ATOM}(?:\.{_ATOM})*"
_ID = rf"{_DOT_ATOM}@(?:{_DOT_ATOM}|\[[\x21-\x5a\x5e-\x7e]*\])"
_MESSAGE_ID = re.compile(rf"<({_ID})>|({_ID})")
MAX_MESSAGE_ID_LENGTH = 250
# What content_hash() covers: who it is from and to, the subject and every part's content.
HASHED_HEADERS = ("From", "To", "Cc", "Bcc", "Reply-To", "Subject")
_DOMAIN = re.compile(r"[^@\s]+\.[^@\s.]+|localhost")


def build_message(spec: Mapping[str, Any], *, sender: str) -> EmailMessage:
    """A ready-to-send message from `spec`, From `sender`, with a Message-ID and a Date."""
    if not isinstance(spec, Mapping):
        raise InvalidTaskArguments("message must be a mapping of fields")
    unknown = sorted(str(key) for key in spec if key not in KNOWN_FIELDS)
    if unknown:
        raise InvalidTaskArguments(f"message has unknown field(s): {', '.join(unknown)}")
    from_address = _addresses("sender", sender, limit=1)
    if not from_address:
        raise InvalidTaskArguments("sender: an address is required")
    recipients = {name: _addresses(name, spec.get(name)) for name in ("to", "cc", "bcc")}
    count = sum(len(found) for found in recipients.values())
    if count == 0:
        raise InvalidTaskArguments("to: at least one recipient (to, cc or bcc) is required")
    if count > MAX_RECIPIENTS:
        raise InvalidTaskArguments(f"to: {count} recipients, at most {MAX_RECIPIENTS} per message")

    message = EmailMessage()
    message["From"] = from_address
    for name, header in (("to", "To"), ("cc", "Cc"), ("bcc", "Bcc")):
        if recipients[name]:
            message[header] = recipients[name]
    reply_to = _addresses("reply_to", spec.get("reply_to"))
    if reply_to:
        message["Reply-To"] = reply_to
    message["Subject"] = _subject(spec.get("subject", ""))
    message["Date"] = formatdate(localtime=True)
    message["Message-ID"] = _message_id(spec.get("message_id"), from_address[0].domain)
    message.set_content(_text("body", spec.get("body"), required=True))
    html = _text("html", spec.get("html"), required=False)
    if html:
        message.add_alternative(html, subtype="html")
    return message


def _addresses(field: str, value: object, *, limit: int | None = None) -> list[Address]:
    if value is None:
        return []
    entries = [value] if isinstance(value, str) else value
    if not isinstance(entries, list | tuple) or not all(isinstance(e, str) for e in entries):
        raise InvalidTaskArguments(f"{field}: must be an address or a list of addresses")
    if limit is not None and len(entries) > limit:
        raise InvalidTaskArguments(f"{field}: at most {limit} address(es)")
    return [_address(field, entry) for entry in entries]


def _address(field: str, entry: str) -> Address:
    if "\r" in entry or "\n" in entry:
        raise InvalidTaskArguments(f"{field}: address contains a line break")
    parsed = getaddresses([entry])
    if len(parsed) != 1 or not parsed[0][1]:
        raise InvalidTaskArguments(f"{field}: {entry!r} is not one email address")
    display_name, addr_spec = parsed[0]
    local, _, domain = addr_spec.rpartition("@")
    if not local or not _DOMAIN.fullmatch(domain):
        raise InvalidTaskArguments(f"{field}: {entry!r} is not a valid email address")
    try:
        return Address(display_name=display_name, addr_spec=addr_spec)
    except (ValueError, IndexError, HeaderParseError) as exc:
        raise InvalidTaskArguments(f"{field}: {entry!r} is not a valid email address") from exc


def _subject(value: object) -> str:
    subject = _text("subject", value, required=False)
    if "\r" in subject or "\n" in subject:
        raise InvalidTaskArguments("subject: must be a single line")
    if len(subject) > MAX_SUBJECT_LENGTH:
        raise InvalidTaskArguments(f"subject: longer than {MAX_SUBJECT_LENGTH} characters")
    return subject


def _text(field: str, value: object, *, required: bool) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise InvalidTaskArguments(f"{field}: must be a string")
    return value


def content_hash(message: EmailMessage) -> str:
    """sha256 of what makes two messages the same message: HASHED_HEADERS and each part's type
    and decoded content. Not Date, Message-ID or MIME boundaries, which differ between two
    builds of one spec."""
    digest = hashlib.sha256()
    for name in HASHED_HEADERS:
        for value in message.get_all(name, []):
            digest.update(f"{name}: {value}\n".encode())
    for part in message.walk():
        if not part.is_multipart():
            digest.update(f"\0{part.get_content_type()}\0".encode())
            digest.update(part.get_payload(decode=True) or b"")
    return digest.hexdigest()


def _message_id(value: object, domain: str) -> str:
    if value is None:
        return make_msgid(domain=domain)
    if not isinstance(value, str) or len(value) > MAX_MESSAGE_ID_LENGTH:
        raise InvalidTaskArguments(
            f"message_id: must be a string of at most {MAX_MESSAGE_ID_LENGTH} characters"
        )
    if not (match := _MESSAGE_ID.fullmatch(value.strip())):
        # ascii() so a control character or non-ASCII letter is visible in the message.
        raise InvalidTaskArguments(
            f"message_id: {value!a} is not like <unique@domain> in ASCII (RFC 5322 3.6.4)"
        )
    return f"<{match.group(1) or match.group(2)}>"
