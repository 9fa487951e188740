"""The columns parsed from a synced message: only its first MAX_PARSED_BYTES are parsed."""

from mailworker.services.parsing import MAX_BODY_TEXT, MAX_PARSED_BYTES, parse_message


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
