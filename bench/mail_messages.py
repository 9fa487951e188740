"""The mail the mail phases move: what lands in the mailboxes, and what is sent.

Both sides of each comparison use these same messages: the shipped tasks and the plain
imaplib and smtplib loops.
"""

from __future__ import annotations

from typing import Any

RECIPIENT = "reader@remote.example"  # not a Dovecot user: the SMTP server takes it, no delivery
BODY_LINES = 60  # about 4 KB of text per message


def _body(number: int) -> str:
    return "\r\n".join(
        f"Line {line} of message {number}: the quarterly figures are attached below, as agreed."
        for line in range(BODY_LINES)
    )


def sample_message(address: str, number: int) -> bytes:
    """A plain-text message of about 4 KB, as it sits in a mailbox."""
    return (
        f"From: Sender {number} <sender{number}@remote.example>\r\n"
        f"To: <{address}>\r\n"
        f"Subject: Report {number} for {address}\r\n"
        "Date: Tue, 01 Dec 2026 12:00:00 +0000\r\n"
        f"Message-ID: <bench-{number}-{address}>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "\r\n"
        f"{_body(number)}\r\n"
    ).encode()


def send_spec(number: int) -> dict[str, Any]:
    """What a client submits for mail `number` (a fresh Message-ID each time it is built)."""
    return {"to": [RECIPIENT], "subject": f"Report {number}", "body": _body(number)}
