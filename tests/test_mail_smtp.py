"""build_message and send_message against a real aiosmtpd that delivers into a real Dovecot."""

from __future__ import annotations

import re
import traceback

import pytest
from mailworker.errors import (
    AuthenticationFailed,
    InvalidTaskArguments,
    PermanentError,
    TransientError,
)
from mailworker.mail.imap import ImapSession
from mailworker.mail.smtp import build_message, send_message

from tests.fixtures.mailservers import DovecotServer, MailUser, SmtpServer, free_port

SENDER = "alice@tenant-a.test"


@pytest.fixture
def recipient(dovecot: DovecotServer) -> MailUser:
    return dovecot.new_user(domain="tenant-b.test")


def imap_message_ids(dovecot: DovecotServer, address: str) -> list[str]:
    with ImapSession(dovecot.endpoint(address)) as imap:
        imap.select("INBOX")
        return [
            line.split(b":", 1)[1].strip().decode()
            for batch in imap.fetch_batches(0, 50)
            for fetched in batch
            for line in fetched.raw.splitlines()
            if line.lower().startswith(b"message-id:")
        ]


@pytest.mark.parametrize("security", ["starttls", "ssl"])
def test_sent_message_arrives_over_imap(dovecot, smtp_server, recipient, security):
    message = build_message(
        {"to": [f"Recipient <{recipient.address}>"], "subject": "Hello", "body": "Hi there."},
        sender=SENDER,
    )
    result = send_message(smtp_server.endpoint(security), message)
    assert result.accepted == (recipient.address,)
    assert result.refused == {}
    assert result.message_id == message["Message-ID"]
    assert imap_message_ids(dovecot, recipient.address) == [result.message_id]
    (delivery,) = smtp_server.delivered(result.message_id)
    assert delivery.mail_from == SENDER
    assert delivery.delivered_to == (recipient.address,)


def test_bcc_is_delivered_but_not_shown(dovecot, smtp_server, recipient):
    hidden = dovecot.new_user()
    message = build_message(
        {"to": recipient.address, "bcc": [hidden.address], "subject": "S", "body": "B"},
        sender=SENDER,
    )
    result = send_message(smtp_server.endpoint(), message)
    assert set(result.accepted) == {recipient.address, hidden.address}
    for address in (recipient.address, hidden.address):
        (stored,) = dovecot.mailbox(address)
        assert stored.message_id == result.message_id
    headers = dovecot.mailbox(recipient.address)[0].raw.split(b"\n\n", 1)[0]
    assert b"Bcc" not in headers
    assert hidden.address.encode() not in headers


def test_html_alternative_and_external_recipients(dovecot, smtp_server, recipient):
    message = build_message(
        {
            "to": [recipient.address, "someone@elsewhere.example"],
            "cc": "Carol <carol@tenant-a.test>",
            "reply_to": "replies@tenant-a.test",
            "subject": "Grüße",
            "body": "plain text",
            "html": "<p>rich text</p>",
            "message_id": "report-42@tenant-a.test",
        },
        sender=SENDER,
    )
    result = send_message(smtp_server.endpoint("ssl"), message)
    assert result.message_id == "<report-42@tenant-a.test>"
    assert set(result.accepted) == {
        recipient.address,
        "someone@elsewhere.example",
        "carol@tenant-a.test",
    }
    (delivery,) = smtp_server.delivered("<report-42@tenant-a.test>")
    # Only Dovecot users get a mailbox copy; the external address is accepted and recorded.
    assert set(delivery.delivered_to) == {recipient.address, "carol@tenant-a.test"}
    (stored,) = dovecot.mailbox(recipient.address)
    assert b"multipart/alternative" in stored.raw
    assert b"<p>rich text</p>" in stored.raw


def test_plain_security_sends_without_tls(dovecot, smtp_server, recipient):
    message = build_message({"to": recipient.address, "body": "lab"}, sender=SENDER)
    send_message(smtp_server.endpoint("plain"), message)
    assert len(dovecot.mailbox(recipient.address)) == 1


def test_unknown_local_recipient_is_refused_and_the_rest_delivered(dovecot, smtp_server, recipient):
    message = build_message(
        {"to": [recipient.address, "ghost@tenant-b.test"], "body": "x"}, sender=SENDER
    )
    result = send_message(smtp_server.endpoint(), message)
    assert result.accepted == (recipient.address,)
    assert list(result.refused) == ["ghost@tenant-b.test"]
    assert result.refused["ghost@tenant-b.test"].startswith("550 5.1.1")


def test_every_recipient_refused_is_permanent(smtp_server):
    message = build_message({"to": "ghost@tenant-b.test", "body": "x"}, sender=SENDER)
    with pytest.raises(
        PermanentError, match=re.escape("refused all 1 recipient(s) (replies 550)")
    ) as error:
        send_message(smtp_server.endpoint(), message)
    assert "ghost" not in str(error.value)  # errors reach task results: no addresses


def test_temporary_failure_is_transient_and_a_retry_delivers_once(dovecot, smtp_server, recipient):
    message = build_message({"to": recipient.address, "body": "retry me"}, sender=SENDER)
    message_id = message["Message-ID"]
    with smtp_server.failing(1, "451 4.3.0 Try again later"):
        with pytest.raises(TransientError, match=re.escape("451 4.3.0")):
            send_message(smtp_server.endpoint(), message)
        assert smtp_server.delivered(message_id) == []
        assert dovecot.mailbox(recipient.address) == []
        send_message(smtp_server.endpoint(), message)
    assert len(smtp_server.delivered(message_id)) == 1
    assert len(dovecot.mailbox(recipient.address)) == 1


def test_permanent_rejection_is_permanent(smtp_server, recipient):
    message = build_message({"to": recipient.address, "body": "no"}, sender=SENDER)
    with (
        smtp_server.failing(1, "554 5.7.1 Message rejected as spam"),
        pytest.raises(PermanentError, match=re.escape("554 5.7.1")) as caught,
    ):
        send_message(smtp_server.endpoint(), message)
    assert not isinstance(caught.value, TransientError)
    assert smtp_server.delivered(message["Message-ID"]) == []


def test_mailbox_down_at_delivery_is_transient(dovecot, smtp_server, recipient):
    message = build_message({"to": recipient.address, "body": "later"}, sender=SENDER)
    dovecot.stop()
    try:
        with pytest.raises(TransientError, match="451"):
            send_message(smtp_server.endpoint(), message)
    finally:
        dovecot.start()
    send_message(smtp_server.endpoint(), message)
    assert len(dovecot.mailbox(recipient.address)) == 1


def test_wrong_password_is_authentication_failed_without_the_password(smtp_server, recipient):
    secret = "Sm7p-Wrong-Secret"
    message = build_message({"to": recipient.address, "body": "x"}, sender=SENDER)
    with pytest.raises(AuthenticationFailed) as caught:
        send_message(smtp_server.endpoint(password=secret), message)
    assert "535" in str(caught.value)
    assert secret not in "".join(traceback.format_exception(caught.value))


def test_starttls_is_required_when_asked_for(smtp_server, recipient):
    # The plain port offers no STARTTLS: credentials must not go out in clear text.
    endpoint = smtp_server.endpoint("starttls", port=smtp_server.plain_port)
    message = build_message({"to": recipient.address, "body": "x"}, sender=SENDER)
    with pytest.raises(PermanentError, match="does not offer STARTTLS"):
        send_message(endpoint, message)


@pytest.mark.parametrize("security", ["starttls", "ssl"])
def test_tls_without_the_ca_fails_permanently(smtp_server, recipient, security):
    message = build_message({"to": recipient.address, "body": "x"}, sender=SENDER)
    with pytest.raises(PermanentError, match="certificate verification failed") as caught:
        send_message(smtp_server.endpoint(security, ca_file=None), message)
    assert not isinstance(caught.value, TransientError)


def test_tls_verification_can_be_switched_off(dovecot, smtp_server, recipient):
    message = build_message({"to": recipient.address, "body": "x"}, sender=SENDER)
    send_message(smtp_server.endpoint("ssl", ca_file=None, verify_tls=False), message)
    assert len(dovecot.mailbox(recipient.address)) == 1


def test_sending_without_login_is_refused(smtp_server, recipient):
    message = build_message({"to": recipient.address, "body": "x"}, sender=SENDER)
    with pytest.raises(PermanentError, match="530"):
        send_message(smtp_server.endpoint("ssl", username=""), message)


def test_nothing_listening_is_transient(smtp_server, recipient):
    message = build_message({"to": recipient.address, "body": "x"}, sender=SENDER)
    with pytest.raises(TransientError, match="refused the connection"):
        send_message(smtp_server.endpoint("plain", port=free_port()), message)


# -- build_message ----------------------------------------------------------------------------


def test_build_message_sets_the_headers():
    message = build_message(
        {
            "to": ["Bob <bob@tenant-b.test>", "carol@tenant-a.test"],
            "cc": [],
            "bcc": "audit@tenant-a.test",
            "subject": "Quarterly report",
            "body": "See attached.",
            "message_id": "<q3@tenant-a.test>",
            "reply_to": ["team@tenant-a.test"],
        },
        sender="Alice <alice@tenant-a.test>",
    )
    assert message["From"] == "Alice <alice@tenant-a.test>"
    assert message["To"] == "Bob <bob@tenant-b.test>, carol@tenant-a.test"
    assert "Cc" not in message
    assert message["Bcc"] == "audit@tenant-a.test"
    assert message["Reply-To"] == "team@tenant-a.test"
    assert message["Message-ID"] == "<q3@tenant-a.test>"
    assert message["Date"]
    assert message.get_content().strip() == "See attached."


def test_build_message_generates_a_message_id_in_the_sender_domain():
    message = build_message({"to": "bob@tenant-b.test", "body": "x"}, sender=SENDER)
    assert message["Message-ID"].endswith("@tenant-a.test>")


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"to": "not an address", "body": "x"}, "to"),
        ({"to": "bob@", "body": "x"}, "to"),
        ({"body": "x"}, "to"),
        ({"to": [], "cc": [], "body": "x"}, "to"),
        ({"to": "bob@tenant-b.test", "cc": {"a": 1}, "body": "x"}, "cc"),
        ({"to": "bob@tenant-b.test", "bcc": ["x@y.org\r\nBcc: evil@y.org"], "body": "x"}, "bcc"),
        ({"to": "bob@tenant-b.test", "body": "x", "subject": "one\r\nBcc: evil@y.org"}, "subject"),
        ({"to": "bob@tenant-b.test", "body": "x", "subject": 7}, "subject"),
        ({"to": "bob@tenant-b.test"}, "body"),
        ({"to": "bob@tenant-b.test", "body": b"bytes"}, "body"),
        ({"to": "bob@tenant-b.test", "body": "x", "html": ["<p>"]}, "html"),
        ({"to": "bob@tenant-b.test", "body": "x", "message_id": "no-at-sign"}, "message_id"),
        ({"to": "bob@tenant-b.test", "body": "x", "reply_to": "a@b@c"}, "reply_to"),
        ({"to": "bob@tenant-b.test", "body": "x", "attachments": []}, "attachments"),
        ({"to": [f"u{i}@tenant-b.test" for i in range(101)], "body": "x"}, "to"),
    ],
)
def test_build_message_names_the_bad_field(spec, field):
    with pytest.raises(InvalidTaskArguments, match=field):
        build_message(spec, sender=SENDER)


def test_build_message_rejects_a_bad_sender_and_a_non_mapping():
    with pytest.raises(InvalidTaskArguments, match="sender"):
        build_message({"to": "bob@tenant-b.test", "body": "x"}, sender="nobody")
    with pytest.raises(InvalidTaskArguments, match="mapping"):
        build_message(["to", "bob@tenant-b.test"], sender=SENDER)  # type: ignore[arg-type]


def test_smtp_fixture_records_each_accepted_send(smtp_server: SmtpServer, recipient):
    message = build_message({"to": recipient.address, "body": "count me"}, sender=SENDER)
    send_message(smtp_server.endpoint(), message)
    send_message(smtp_server.endpoint(), message)  # a deliberate second send is counted too
    assert len(smtp_server.delivered(message["Message-ID"])) == 2
