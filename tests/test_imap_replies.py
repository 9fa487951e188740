"""The IMAP reader (mail/imap_replies.py) on replies in the shapes real servers send.

Each reply is recorded wire text, replayed to imaplib (tests/fixtures/imap_wire.py), so the
reader gets exactly the list imaplib hands the application. A property-based test builds FETCH
replies from random messages and checks the reader returns exactly them.
"""

from __future__ import annotations

import string
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mailworker.mail.imap_replies import (
    FetchResponse,
    UnreadableReply,
    parse_esearch,
    parse_fetch,
    parse_search,
    sequence_set,
)

from tests.fixtures.imap_wire import ReplayServer, replayed

RAW = b"From: a@example.org\r\nSubject: UID 7 FLAGS (x)\r\n\r\n* 9 FETCH (UID 9)\r\n"
OTHER = b"Subject: second\r\n\r\nBODY[] {3}\r\nabc)\r\n"


def literal(raw: bytes) -> bytes:
    return b"{%d}\r\n" % len(raw) + raw


@pytest.fixture(scope="module")
def replay() -> Iterator[ReplayServer]:
    server = ReplayServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def conn(replay: ReplayServer):
    client = replay.client()
    yield client
    client.logout()


def bodies(responses: list[FetchResponse]) -> dict[int, tuple[bytes | None, tuple[str, ...]]]:
    """What fetch_batches takes from a reply: per UID the body and the last flags seen."""
    found: dict[int, tuple[bytes | None, tuple[str, ...]]] = {}
    for response in responses:
        if response.uid is None:
            continue
        body, flags = found.get(response.uid, (None, ()))
        found[response.uid] = (
            response.body if response.body is not None else body,
            response.flags if response.flags is not None else flags,
        )
    return found


FETCH_REPLIES = {
    # Dovecot: UID first, FLAGS before the literal.
    "dovecot": (
        b"* 1 FETCH (UID 3 FLAGS (\\Seen $Forwarded) BODY[] " + literal(RAW) + b")\r\n"
        b"* 2 FETCH (UID 4 FLAGS () BODY[] " + literal(OTHER) + b")\r\n",
        {3: (RAW, ("\\Seen", "$Forwarded")), 4: (OTHER, ())},
    ),
    # Dovecot with CONDSTORE enabled: a MODSEQ item (a parenthesised number) per message.
    "dovecot-condstore": (
        b"* 1 FETCH (UID 3 MODSEQ (12345678901) FLAGS (\\Seen) BODY[] " + literal(RAW) + b")\r\n",
        {3: (RAW, ("\\Seen",))},
    ),
    # Cyrus: FLAGS before UID; \Recent is per session and dropped.
    "cyrus": (
        b"* 1 FETCH (FLAGS (\\Recent \\Answered) UID 3 BODY[] " + literal(RAW) + b")\r\n",
        {3: (RAW, ("\\Answered",))},
    ),
    # Gmail: X-GM-* items (a 64-bit id, a list of quoted labels) around UID and FLAGS.
    "gmail": (
        b"* 1 FETCH (X-GM-THRID 1278455344230334865 X-GM-MSGID 1278455344230334865 "
        b'X-GM-LABELS ("\\\\Important" "\\\\Inbox" Work) UID 3 MODSEQ (9452) FLAGS (\\Seen) '
        b"BODY[] " + literal(RAW) + b")\r\n",
        {3: (RAW, ("\\Seen",))},
    ),
    # Exchange: the body first, UID and FLAGS after the literal.
    "exchange": (
        b"* 1 FETCH (BODY[] " + literal(RAW) + b" UID 3 FLAGS (\\Seen))\r\n"
        b"* 2 FETCH (BODY[] " + literal(OTHER) + b" UID 4 FLAGS ())\r\n",
        {3: (RAW, ("\\Seen",)), 4: (OTHER, ())},
    ),
    # A keyword spelled like an item name must not be taken for the UID item.
    "flags-holding-uid": (
        b"* 1 FETCH (FLAGS (UID 7 $Label1) UID 3 BODY[] " + literal(RAW) + b")\r\n",
        {3: (RAW, ("UID", "7", "$Label1"))},
    ),
    # Another session changed flags: unsolicited FETCH lines (without UID, or with the UID of a
    # message not asked for) interleaved with the answers; they belong to no fetched message.
    "unsolicited-interleaved": (
        b"* 1 FETCH (UID 3 FLAGS () BODY[] " + literal(RAW) + b")\r\n"
        b"* 5 FETCH (FLAGS (\\Deleted \\Seen))\r\n"
        b"* 2 FETCH (BODY[] " + literal(OTHER) + b" UID 4 FLAGS (\\Flagged))\r\n"
        b"* 9 FETCH (UID 11 MODSEQ (77) FLAGS (\\Seen))\r\n",
        {3: (RAW, ()), 4: (OTHER, ("\\Flagged",)), 11: (None, ("\\Seen",))},
    ),
    # Body first, then an unsolicited flag change of another message: not this one's flags.
    "exchange-then-unsolicited": (
        b"* 1 FETCH (BODY[] " + literal(RAW) + b" UID 3)\r\n"
        b"* 5 FETCH (FLAGS (\\Deleted \\Seen))\r\n",
        {3: (RAW, ())},
    ),
    # A flag update for a fetched message after its answer: the later flags are the newer ones.
    "flags-update-after-body": (
        b"* 1 FETCH (UID 3 FLAGS () BODY[] " + literal(RAW) + b")\r\n"
        b"* 1 FETCH (UID 3 FLAGS (\\Seen))\r\n",
        {3: (RAW, ("\\Seen",))},
    ),
    # A requested message answered without its body (NIL, or no BODY[] at all).
    "no-body": (
        b"* 1 FETCH (UID 3 FLAGS () BODY[] NIL)\r\n* 2 FETCH (UID 4 FLAGS (\\Seen))\r\n",
        {3: (None, ()), 4: (None, ("\\Seen",))},
    ),
    "quoted-body": (b'* 1 FETCH (UID 3 BODY[] "short")\r\n', {3: (b"short", ())}),
    "nothing": (b"", {}),
}


@pytest.mark.parametrize("shape", FETCH_REPLIES)
def test_fetch_replies_in_the_shapes_servers_send(replay, conn, shape):
    wire, expected = FETCH_REPLIES[shape]
    data = replayed(replay, conn, wire, "FETCH")
    assert bodies(parse_fetch(data)) == expected


def test_sizes_reply():
    data = [b"1 (UID 3 RFC822.SIZE 26214401 FLAGS (\\Seen))", b"2 (RFC822.SIZE 12 UID 4)"]
    assert [(r.uid, r.size, r.flags) for r in parse_fetch(data)] == [
        (3, 26214401, ("\\Seen",)),
        (4, 12, None),
    ]


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        (b"* SEARCH 2 5 6\r\n", [2, 5, 6]),
        (b"* SEARCH\r\n", []),
        (b"", []),
        (b"* SEARCH 2 5 6 7 11 (MODSEQ 917162500)\r\n", [2, 5, 6, 7, 11]),  # RFC 7162 3.1.5
        (b"* SEARCH 1 2\r\n* SEARCH 9\r\n", [1, 2, 9]),
    ],
)
def test_search_replies(replay, conn, wire, expected):
    assert parse_search(replayed(replay, conn, wire, "SEARCH")) == expected


def test_esearch_replies(replay, conn):
    wire = b'* ESEARCH (TAG "A1") UID ALL 1:3,5\r\n'
    replayed(replay, conn, wire, "SEARCH")
    _, data = conn.response("ESEARCH")
    assert parse_esearch(data) == [1, 2, 3, 5]
    replayed(replay, conn, b'* ESEARCH (TAG "A2") UID\r\n', "SEARCH")
    assert parse_esearch(conn.response("ESEARCH")[1]) == []
    assert parse_esearch([b'(TAG "A3") UID MIN 4 ALL 4 MAX 4 MODSEQ 10']) == [4]
    assert parse_esearch([b"UID ALL 9:7,2"]) == [2, 7, 8, 9]
    with pytest.raises(UnreadableReply, match="not about UIDs"):
        parse_esearch([b'(TAG "A4") ALL 1:3'])  # sequence numbers, not UIDs


@pytest.mark.parametrize(
    "data",
    [
        [b"1 (UID 3 FLAGS (\\Seen)"],  # unclosed list
        [b"1 (UID 0 FLAGS ())"],  # 0 is no UID
        [b"1 (UID)"],  # an item without a value
        [b"(UID 3)"],  # no message number
        [b"1 (UID 3 FLAGS \\Seen)"],  # FLAGS not a list
    ],
)
def test_unreadable_fetch_replies_are_errors(data):
    with pytest.raises(UnreadableReply):
        parse_fetch(data)


def test_sequence_sets():
    assert sequence_set(b"1:3,5,7:6") == [1, 2, 3, 5, 6, 7]
    assert sequence_set(4) == [4]
    with pytest.raises(UnreadableReply):
        sequence_set(b"1:*")


# --- property: whatever the messages, the reader returns exactly them -----------------------

_KEYWORD = st.text(string.ascii_letters + string.digits + "$_-.", min_size=1, max_size=12)
_FLAG = st.one_of(
    st.sampled_from(["\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft", "UID"]),
    _KEYWORD,
)
_MESSAGES = st.dictionaries(
    keys=st.integers(min_value=1, max_value=2**32 - 1),
    values=st.tuples(st.binary(max_size=300), st.lists(_FLAG, max_size=5, unique=True)),
    max_size=6,
)


def render(seq: int, uid: int, body: bytes, flags: list[str], *, order: int, quoted: bool) -> bytes:
    """One FETCH response; `order` picks where UID and FLAGS go relative to the body."""
    body_item = b"BODY[] " + (b'"' + body + b'"' if quoted else literal(body))
    items = [b"UID %d" % uid, b"FLAGS (" + " ".join(flags).encode() + b")", body_item]
    orders = [(0, 1, 2), (1, 0, 2), (2, 0, 1), (1, 2, 0), (0, 2, 1), (2, 1, 0)]
    return b"* %d FETCH (" % seq + b" ".join(items[i] for i in orders[order]) + b")\r\n"


_FIXTURES_ARE_REUSED = [HealthCheck.function_scoped_fixture]  # one replay server, one session


@settings(max_examples=150, deadline=None, suppress_health_check=_FIXTURES_ARE_REUSED)
@given(
    messages=_MESSAGES,
    orders=st.lists(st.integers(min_value=0, max_value=5), min_size=6, max_size=6),
    unsolicited=st.lists(st.tuples(st.integers(1, 50), st.lists(_FLAG, max_size=3)), max_size=3),
    data=st.data(),
)
def test_fetch_reader_returns_exactly_the_messages_sent(
    replay, conn, messages, orders, *, unsolicited, data
):
    wire = b""
    for position, (uid, (body, flags)) in enumerate(messages.items()):
        # A short body of plain text may come as a quoted string, as some servers send it.
        plain = all(32 <= byte < 127 and byte not in b'"\\' for byte in body) and len(body) < 60
        quoted = plain and data.draw(st.booleans())
        wire += render(position + 1, uid, body, flags, order=orders[position], quoted=quoted)
        if unsolicited:  # another session's flag change, without a UID
            seq, other_flags = unsolicited.pop()
            wire += b"* %d FETCH (FLAGS (" % seq + " ".join(other_flags).encode() + b"))\r\n"
    parsed = parse_fetch(replayed(replay, conn, wire, "FETCH"))
    got = {r.uid: (r.body, list(r.flags or ())) for r in parsed if r.uid is not None}
    assert got == {uid: (body, flags) for uid, (body, flags) in messages.items()}
    assert all(r.body is None for r in parsed if r.uid is None)
