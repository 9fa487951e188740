"""What the spam rules look at, read once from a raw message.

Parsing is forgiving on purpose: spam is often malformed, and a header that cannot be parsed
must not stop the scoring (it simply yields nothing for the rules that need it).
"""

from __future__ import annotations

import email
import email.errors
import ipaddress
import re
from dataclasses import dataclass
from email.message import EmailMessage, Message
from email.policy import default as default_policy
from email.utils import getaddresses
from html.parser import HTMLParser
from urllib.parse import urlsplit

# Enough text to judge a message by; the rest of a huge body changes nothing but the cost.
MAX_TEXT = 200_000
_PARSE_ERRORS = (email.errors.MessageError, ValueError, IndexError, AttributeError, TypeError)
_URL = re.compile(r"https?://[^\s<>\"')]+", re.IGNORECASE)
_DOMAIN_LIKE = re.compile(r"(?:https?://)?((?:[a-z0-9-]+\.)+[a-z]{2,})(?:[/:?#]\S*)?", re.I)
_AUTH_RESULT = re.compile(r"\b(spf|dkim|dmarc)\s*=\s*([a-z]+)", re.IGNORECASE)


@dataclass(frozen=True)
class Link:
    """A hyperlink: where it goes and, for HTML anchors, the text the reader sees."""

    href: str
    text: str = ""


@dataclass(frozen=True)
class MessageFacts:
    recipient: str
    from_addresses: tuple[str, ...]
    return_path: str | None
    reply_to: tuple[str, ...]
    listed_recipients: tuple[str, ...]
    subject: str
    text: str
    links: tuple[Link, ...]
    auth_results: dict[str, frozenset[str]]
    has_message_id: bool
    is_list_mail: bool

    @classmethod
    def from_bytes(cls, raw: bytes, *, recipient: str) -> MessageFacts:
        message = email.message_from_bytes(raw, policy=default_policy)
        text_parts, links = _body(message)
        return_path = _addresses(message, "Return-Path")
        recipients = _addr_specs([recipient])
        return cls(
            recipient=recipients[0] if recipients else "",
            from_addresses=_addresses(message, "From"),
            return_path=return_path[0] if return_path else None,
            reply_to=_addresses(message, "Reply-To"),
            listed_recipients=_addresses(message, "To") + _addresses(message, "Cc"),
            subject=" ".join(_headers(message, "Subject")),
            text="\n".join(text_parts)[:MAX_TEXT],
            links=tuple(links),
            auth_results=_auth_results(message),
            has_message_id=bool(_headers(message, "Message-ID")),
            is_list_mail=bool(_headers(message, "List-Id")),
        )


def organizational_domain(address_or_host: str) -> str:
    """The last two labels of a domain: an approximation without the public suffix list.

    For names under multi-label suffixes (example.co.uk) it returns the suffix, so domains there
    compare equal and the domain rules stay silent rather than fire wrongly.
    """
    host = address_or_host.rpartition("@")[2].strip().strip(".").lower()
    return ".".join(host.split(".")[-2:])


def is_ip_literal(host: str) -> bool:
    """True for dotted or bracketed IP addresses and the all-digit forms browsers also accept."""
    host = host.strip("[]")
    if host.isdigit() or host.lower().startswith("0x"):
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def link_host(url: str) -> str:
    try:
        return (urlsplit(url.strip()).hostname or "").lower()
    except ValueError:
        return ""


def shown_domain(text: str) -> str | None:
    """The domain an anchor's visible text claims to lead to, if it looks like a URL or domain."""
    match = _DOMAIN_LIKE.fullmatch(text.strip())
    return match.group(1).lower() if match else None


def _headers(message: Message, name: str) -> list[str]:
    try:
        return [str(value) for value in message.get_all(name, [])]
    except _PARSE_ERRORS:
        return []


def _addresses(message: Message, name: str) -> tuple[str, ...]:
    return tuple(_addr_specs(_headers(message, name)))


def _addr_specs(values: list[str]) -> list[str]:
    try:
        pairs = getaddresses(values)
    except _PARSE_ERRORS:
        return []
    return [addr.lower() for _, addr in pairs if "@" in addr]


def _auth_results(message: Message) -> dict[str, frozenset[str]]:
    """Method -> results from the topmost Authentication-Results header.

    Only the topmost one was added by our own receiving server; headers further down arrived with
    the message and may be forged (RFC 8601 section 5).
    """
    headers = _headers(message, "Authentication-Results")
    results: dict[str, set[str]] = {}
    for method, result in _AUTH_RESULT.findall(headers[0] if headers else ""):
        results.setdefault(method.lower(), set()).add(result.lower())
    return {method: frozenset(values) for method, values in results.items()}


def _body(message: Message) -> tuple[list[str], list[Link]]:
    texts: list[str] = []
    links: list[Link] = []
    for part in message.walk():
        if part.is_multipart() or part.get_content_maintype() != "text":
            continue
        if part.get_content_disposition() == "attachment":
            continue
        content = _decoded(part)[:MAX_TEXT]
        if part.get_content_subtype() == "html":
            reader = _HtmlReader()
            reader.feed(content)
            reader.close()
            texts.append(reader.text())
            links.extend(reader.links)
        else:
            texts.append(content)
            links.extend(Link(url) for url in _URL.findall(content))
    return texts, links


def _decoded(part: Message) -> str:
    if isinstance(part, EmailMessage):
        try:
            return str(part.get_content())
        except (LookupError, *_PARSE_ERRORS):  # unknown charset, broken transfer encoding
            pass
    payload = part.get_payload(decode=True)
    return payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""


class _HtmlReader(HTMLParser):
    """Visible text and anchors of an HTML part."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.links: list[Link] = []
        self._chunks: list[str] = []
        self._href: str | None = None
        self._anchor_text: list[str] = []
        self._hidden_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style"):
            self._hidden_depth += 1
        elif tag == "a":
            self._href = dict(attrs).get("href") or ""
            self._anchor_text = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self._hidden_depth = max(0, self._hidden_depth - 1)
        elif tag == "a" and self._href is not None:
            self.links.append(Link(self._href, " ".join("".join(self._anchor_text).split())))
            self._href = None

    def handle_data(self, data: str) -> None:
        if self._hidden_depth:
            return
        self._chunks.append(data)
        if self._href is not None:
            self._anchor_text.append(data)

    def text(self) -> str:
        return " ".join("".join(self._chunks).split())
