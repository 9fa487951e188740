"""IMAP wire syntax that imaplib leaves to its caller: mailbox names, UID sets, flags, codes.

Replies (FETCH, SEARCH, ESEARCH) are read by imap_replies.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Sequence

from mailworker.errors import InvalidTaskArguments

MAX_UID = 2**32 - 1
_PRINTABLE_ASCII = range(0x20, 0x7F)
_FLAG = re.compile(r"\\?[A-Za-z0-9$_.\-]+")
_HEADER_NAME = re.compile(r"[!-9;-~]+")
_RESPONSE_CODE = re.compile(r"^\[([A-Z][A-Z0-9-]*)")


def quote(value: str) -> str:
    """An IMAP quoted string (the caller makes sure it is one line of ASCII)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def mailbox_name(name: str) -> str:
    """A folder name as IMAP commands want it: modified UTF-7, quoted."""
    return quote(modified_utf7(name))


def modified_utf7(name: str) -> str:
    """A folder name in IMAP's modified UTF-7 (RFC 3501 5.1.3): "Entwürfe" -> "Entw&APw-rfe"."""
    if not isinstance(name, str) or not name or any(ord(ch) < 0x20 for ch in name):  # noqa: PLR2004
        raise InvalidTaskArguments(f"folder name {name!r} is empty or contains control characters")
    encoded: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            utf16 = "".join(pending).encode("utf-16-be")
            b64 = base64.b64encode(utf16).decode().rstrip("=").replace("/", ",")
            encoded.append(f"&{b64}-")
            pending.clear()

    for ch in name:
        if ord(ch) in _PRINTABLE_ASCII:
            flush()
            encoded.append("&-" if ch == "&" else ch)
        else:
            pending.append(ch)
    flush()
    return "".join(encoded)


def uid_set(uids: Iterable[int]) -> str:
    """A compact UID set ("3,5:9") from UIDs in any order; empty when there are none."""
    values = sorted(set(_checked_uids(uids)))
    ranges: list[str] = []
    start = end = None
    for uid in values:
        if end is not None and uid == end + 1:
            end = uid
            continue
        if start is not None:
            ranges.append(str(start) if start == end else f"{start}:{end}")
        start = end = uid
    if start is not None:
        ranges.append(str(start) if start == end else f"{start}:{end}")
    return ",".join(ranges)


def _checked_uids(uids: Iterable[int]) -> Iterable[int]:
    if isinstance(uids, str | bytes):
        raise InvalidTaskArguments("uids must be a list of integers")
    for uid in uids:
        if isinstance(uid, bool) or not isinstance(uid, int) or not 0 < uid <= MAX_UID:
            raise InvalidTaskArguments(f"uids: {uid!r} is not a valid IMAP UID")
        yield uid


def flag_list(flags: Sequence[str]) -> str | None:
    """A parenthesised flag list for APPEND, or None when there are no flags."""
    if isinstance(flags, str):
        raise InvalidTaskArguments("flags must be a list of flag names, not a string")
    for flag in flags:
        if not isinstance(flag, str) or not _FLAG.fullmatch(flag) or flag.lower() == "\\recent":
            raise InvalidTaskArguments(f"flags: {flag!r} is not a flag a client may set")
    return "(" + " ".join(flags) + ")" if flags else None


def header_name(name: str) -> str:
    """A header field name checked against RFC 5322's field-name syntax."""
    if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
        raise InvalidTaskArguments(f"header name {name!r} is not a valid header field name")
    return name


def response_code(text: str) -> str | None:
    """The bracketed response code ("TRYCREATE", "AUTHENTICATIONFAILED") a reply starts with."""
    match = _RESPONSE_CODE.match(text)
    return match.group(1) if match else None


def as_text(value: object) -> str:
    """imaplib hands out replies (and error arguments) as bytes or str; messages want str."""
    if isinstance(value, BaseException) and len(value.args) == 1:
        value = value.args[0]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)
