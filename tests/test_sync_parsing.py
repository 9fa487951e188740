"""The columns parsed from a synced message: only its first MAX_PARSED_BYTES are parsed."""

from email import policy
from pathlib import Path

import pytest
from mailworker.services import parsing
from mailworker.services.parsing import MAX_BODY_TEXT, MAX_PARSED_BYTES, parse_message

MAIL = Path(__file__).parent / "data" / "mail"


def test_a_large_message_is_parsed_from_its_start():
    attachment = b"QUJD" * 19 + b"\r\n"  # base64 lines
    raw = (
        b"From: Sender <sender@example.org>\r\nTo: a@tenant-a.test\r\nSubject: Holiday photos\r\n"
        b"Message-ID: <big@example.org>\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHere they are.\r\n"
        b"--b\r\nContent-Type: image/jpeg\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + attachment * (3 * MAX_PARSED_BYTES // len(attachment))
        + b"--b--\r\n"
    )
    assert len(raw) > 3 * MAX_PARSED_BYTES
    parsed = parse_message(raw)
    assert (parsed.subject, parsed.message_id) == ("Holiday photos", "<big@example.org>")
    assert parsed.recipients == "a@tenant-a.test"
    assert parsed.body_text.strip() == "Here they are."


def test_body_text_of_a_long_plain_message_is_capped():
    raw = b"Subject: long\r\n\r\n" + b"x" * 76 + b"\r\n" + b"y" * (2 * MAX_PARSED_BYTES)
    parsed = parse_message(raw)
    assert parsed.subject == "long"
    assert len(parsed.body_text) == MAX_BODY_TEXT


# Messages whose MIME structure headers are unusual: each is parsed the same with the cache as
# with the email package's policy.default, twice (the second time from the cache).
ODD_MESSAGES = [
    b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\nFrom: =?utf-8?b?SsO8cmdlbg==?= <j@example.org>\r\n"
    b'To: a@x.test, "B, C" <b@x.test>\r\nCc: c@x.test\r\nDate: Tue, 1 Dec 2026 12:00:00 +0100\r\n'
    b'MIME-Version: 1.0\r\nContent-Type: TEXT/Plain (comment); CharSet="ISO-8859-1"\r\n'
    b"Content-Transfer-Encoding: quoted-printable\r\n\r\nGr=FC=DFe\r\n",
    b'Subject: html only\r\nContent-Type: multipart/alternative; boundary="x y"\r\n\r\n'
    b"--x y\r\nContent-Type: text/html; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: base64\r\n\r\nPGI+aGk8L2I+\r\n--x y--\r\n",
    b"Subject: broken type\r\nContent-Type: text/\r\n\r\nbody\r\n",
    b"Subject: no boundary\r\nContent-Type: multipart/mixed\r\n\r\nbody\r\n",
    b"Subject: unknown charset\r\nContent-Type: text/plain; charset=x-no-such\r\n\r\nbody\r\n",
    b"Subject: rfc2231\r\nContent-Type: text/plain; charset*=utf-8''utf%2D8\r\n\r\nbody\r\n",
    b'Subject: folded\r\nContent-Type: multipart/mixed;\r\n boundary="b"\r\n\r\n'
    b"--b\r\nContent-Type: text/plain\r\n\r\none\r\n--b\r\nContent-Type: message/rfc822\r\n\r\n"
    b"Subject: inner\r\n\r\ninner\r\n--b--\r\n",
]


@pytest.mark.parametrize("raw", ODD_MESSAGES + sorted(p.read_bytes() for p in MAIL.glob("*.eml")))
def test_the_structure_header_cache_parses_as_the_email_package_does(raw, monkeypatch):
    cached = [parse_message(raw), parse_message(raw)]
    monkeypatch.setattr(parsing, "PARSE_POLICY", policy.default)
    assert cached == [parse_message(raw)] * 2


def test_one_header_class_per_kind_whatever_the_header_names():
    for number in range(200):
        parse_message(f"X-Custom-{number}: a\r\nSubject: s\r\nFrom: a@x.test\r\n\r\nb".encode())
    registry = parsing.PARSE_POLICY.header_factory
    assert len(registry._classes) <= len(set(registry.registry.values())) + 1


def test_the_structure_header_cache_is_bounded():
    for number in range(2 * parsing.CACHED_HEADERS):
        parse_message(f'Content-Type: text/plain; name="{number}"\r\n\r\nx\r\n'.encode())
    raw = b"Content-Type: text/plain; name=" + b"n" * parsing.CACHED_HEADER_CHARS + b"\r\n\r\nx\r\n"
    before = parsing._structure_header.cache_info()
    parse_message(raw)
    parse_message(raw)
    after = parsing._structure_header.cache_info()
    assert after.currsize == parsing.CACHED_HEADERS
    assert (after.hits, after.misses) == (before.hits, before.misses)  # too long: not cached
