"""Reading the untagged replies imaplib hands back: FETCH, SEARCH and ESEARCH.

imaplib returns a reply as a flat list: a (prefix, literal) tuple per literal, then the rest of
the line as bytes, with nothing marking where one response ends and the next begins. Tokenising
and nesting that list is done by IMAPClient's parser (`imapclient.response_parser.parse_response`,
a maintained and widely used IMAP library), which turns it into `n (ITEM value ...)` pairs; this
module only interprets each response's top-level items. So a FLAGS list holding the keyword "UID"
is just a flag, an unsolicited `* n FETCH (FLAGS ...)` is its own response (with no UID: ignored),
and MODSEQ or X-GM-* items are items like any other.

Why not switch ImapSession to IMAPClient altogether: its `fetch()` keys responses by UID and falls
back to the sequence number for a response without one, so an unsolicited `* 3 FETCH (FLAGS ...)`
lands on the message whose UID is 3. Reading the parsed responses here avoids that, and keeps the
session's connection, TLS, login and error mapping (which the tasks rely on) as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from imapclient.exceptions import ProtocolError
from imapclient.response_parser import parse_response

from mailworker.mail.imap_syntax import MAX_UID

_Atom = object


class UnreadableReply(ValueError):
    """The server's reply does not follow the IMAP grammar (the caller names the server)."""


@dataclass(frozen=True)
class FetchResponse:
    """One `* seq FETCH (...)` response: the items the sync asks for, None where absent."""

    seq: int
    uid: int | None
    flags: tuple[str, ...] | None
    size: int | None  # RFC822.SIZE
    body: bytes | None  # BODY[] (None also when the server sent BODY[] NIL)


def parse_fetch(data: Sequence[object]) -> list[FetchResponse]:
    """Every FETCH response in imaplib's reply, in the order the server sent them."""
    parsed = _parse(data)
    if len(parsed) % 2:
        raise UnreadableReply(f"FETCH reply is not pairs of number and item list: {_shape(parsed)}")
    responses: list[FetchResponse] = []
    for seq, items in zip(parsed[::2], parsed[1::2], strict=True):
        if not isinstance(seq, int) or not isinstance(items, tuple) or len(items) % 2:
            raise UnreadableReply(f"FETCH response {seq!r:.20} has no item list of pairs")
        fields: dict[bytes, _Atom] = {}
        for name, value in zip(items[::2], items[1::2], strict=True):
            if not isinstance(name, bytes):
                raise UnreadableReply(f"FETCH item name {name!r:.40} is not an atom")
            fields[name.upper()] = value
        responses.append(
            FetchResponse(
                seq=seq,
                uid=_uid(fields[b"UID"]) if b"UID" in fields else None,
                flags=_flags(fields[b"FLAGS"]) if b"FLAGS" in fields else None,
                size=_size(fields[b"RFC822.SIZE"]) if b"RFC822.SIZE" in fields else None,
                body=_body(fields.get(b"BODY[]")),
            )
        )
    return responses


def parse_search(data: Sequence[object]) -> list[int]:
    """The numbers of imaplib's SEARCH data: `* SEARCH 2 5 6`, empty, or with `(MODSEQ n)`."""
    numbers: list[int] = []
    for item in _parse(data):
        if isinstance(item, tuple):  # (MODSEQ 917162500), RFC 7162 3.1.5
            continue
        numbers.append(_uid(item))
    return numbers


def parse_esearch(data: Sequence[object]) -> list[int]:
    """The UIDs in `* ESEARCH (TAG "A1") UID ALL 1:3,5` responses (RFC 4731), ascending.

    Only replies to a UID SEARCH count (the UID marker); MIN, MAX, COUNT and MODSEQ are ignored.
    """
    uids: list[int] = []
    for line in data:
        if line is None:
            continue
        items = list(_parse([line]))
        if items and isinstance(items[0], tuple):  # the (TAG "A1") correlator
            items.pop(0)
        if not items or not isinstance(items[0], bytes) or items[0].upper() != b"UID":
            raise UnreadableReply(f"ESEARCH reply is not about UIDs: {line!r:.200}")
        items.pop(0)
        if len(items) % 2:
            raise UnreadableReply(f"ESEARCH reply is not pairs of name and value: {line!r:.200}")
        for name, value in zip(items[::2], items[1::2], strict=True):
            if isinstance(name, bytes) and name.upper() == b"ALL":
                uids.extend(sequence_set(value))
    return sorted(set(uids))


def sequence_set(value: _Atom) -> list[int]:
    """The numbers of an IMAP sequence set such as "1:3,5" (or a lone number), in order given."""
    if isinstance(value, int) and not isinstance(value, bool):
        return [_uid(value)]
    if not isinstance(value, bytes):
        raise UnreadableReply(f"{value!r:.40} is not a sequence set")
    numbers: list[int] = []
    for part in value.split(b","):
        first, _, last = part.partition(b":")
        low, high = _uid(first), _uid(last or first)
        low, high = min(low, high), max(low, high)  # "5:3" means "3:5"
        numbers.extend(range(low, high + 1))
    return numbers


def _parse(data: Sequence[object]) -> tuple[_Atom, ...]:
    lines = [item for item in data if item is not None]
    for item in lines:
        if not isinstance(item, bytes | tuple):
            raise UnreadableReply(f"unexpected reply element: {_shape(item)}")
    try:
        return parse_response(lines)  # type: ignore[arg-type]
    except (ProtocolError, ValueError, AssertionError) as exc:  # the lexer asserts, too
        # IMAPClient's messages quote what it parsed so far, message text included: not shown.
        raise UnreadableReply(f"the IMAP parser refused it ({type(exc).__name__})") from None


def _uid(value: _Atom) -> int:
    if isinstance(value, bytes) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_UID:
        raise UnreadableReply(f"{value!r:.40} is not a UID or sequence number")
    return value


def _size(value: _Atom) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UnreadableReply(f"RFC822.SIZE {value!r:.40} is not a size")
    return value


def _flags(value: _Atom) -> tuple[str, ...]:
    if not isinstance(value, tuple):
        raise UnreadableReply(f"FLAGS {value!r:.80} is not a list")
    names = []
    for flag in value:
        # The parser reads an all-digit keyword as an int and the keyword NIL as None.
        name = "NIL" if flag is None else str(flag) if isinstance(flag, int) else flag
        if not isinstance(name, bytes | str):
            raise UnreadableReply(f"flag {flag!r:.40} is not an atom")
        text = name.decode("utf-8", "replace") if isinstance(name, bytes) else name
        # \Recent belongs to one session (and is gone in IMAP4rev2): not a property of the mail.
        if text.lower() != "\\recent":
            names.append(text)
    return tuple(names)


def _body(value: _Atom) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, int):  # a quoted or atom body of digits only: still the message text
        return str(value).encode()
    raise UnreadableReply(f"BODY[] is not a string: {_shape(value)}")


def _shape(value: object) -> str:
    """What a reply element is, without its content: error text must never carry mail."""
    if isinstance(value, tuple | list):
        return f"a list of {len(value)} item(s)"
    if isinstance(value, bytes | str):
        return f"a string of {len(value)} byte(s)"
    return type(value).__name__
