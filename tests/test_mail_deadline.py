"""Every IMAP session and SMTP exchange ends at its wall-clock deadline, whatever the pool.

The servers are the real Dovecot and aiosmtpd behind a proxy that trickles their replies one
byte a second: each byte arrives well within the socket timeout, so only the deadline ends them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from email.message import EmailMessage

import pytest
from mailworker.errors import TransientError
from mailworker.mail.imap import ImapSession
from mailworker.mail.smtp import send_message
from mailworker.services.access import owned_access
from mailworker.settings import SETTINGS, load_settings

from tests.fixtures.trickle import TricklingProxy

INTERVAL = 1.0  # one byte a second: far inside the 5 s socket timeout below
TIMEOUT = 5.0
SLACK = 2.5  # a loaded 2-core machine: thread wake-up and the error's way up


def ends_at_deadline(action: Callable[[], object], deadline: float) -> TransientError:
    start = time.monotonic()
    with pytest.raises(TransientError) as raised:
        action()
    took = time.monotonic() - start
    assert deadline - 0.1 <= took <= deadline + SLACK, f"ended after {took:.1f} s: {raised.value}"
    assert f"passed its deadline of {deadline:g} s" in str(raised.value)
    return raised.value


def deadline_threads() -> list[threading.Thread]:
    """The deadline timers still running (a cancelled one is given a second to end)."""
    timers = [t for t in threading.enumerate() if t.name.startswith("deadline ")]
    for timer in timers:
        timer.join(1)
    return [timer for timer in timers if timer.is_alive()]


def test_imap_greeting_trickled_ends_at_the_deadline(dovecot):
    user = dovecot.new_user()
    with TricklingProxy(dovecot.port, interval=INTERVAL, trickling=True) as proxy:
        endpoint = dovecot.endpoint(user.address, port=proxy.port, timeout=TIMEOUT, deadline=3)
        ends_at_deadline(lambda: ImapSession(endpoint).__enter__(), 3)
    assert deadline_threads() == []


def test_imap_session_trickled_after_starttls_and_login_ends_at_the_deadline(dovecot):
    user = dovecot.new_user()
    with TricklingProxy(dovecot.port, interval=INTERVAL) as proxy:
        endpoint = dovecot.endpoint(user.address, port=proxy.port, timeout=TIMEOUT, deadline=4)
        start = time.monotonic()
        with ImapSession(endpoint) as imap:
            assert time.monotonic() - start < 3, "login was too slow to test the deadline"
            proxy.trickle()
            with pytest.raises(TransientError) as raised:
                imap.select("INBOX")
        took = time.monotonic() - start
    assert 4 - 0.1 <= took <= 4 + SLACK, f"ended after {took:.1f} s: {raised.value}"
    assert "passed its deadline of 4 s" in str(raised.value)


def test_imap_implicit_tls_handshake_trickled_ends_at_the_deadline(dovecot):
    user = dovecot.new_user()
    with TricklingProxy(dovecot.ssl_port, interval=INTERVAL, trickling=True) as proxy:
        endpoint = dovecot.endpoint(
            user.address, "ssl", port=proxy.port, timeout=TIMEOUT, deadline=3
        )
        ends_at_deadline(lambda: ImapSession(endpoint).__enter__(), 3)


def _message(sender: str, recipient: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = recipient
    message["Subject"] = "deadline"
    message["Message-ID"] = f"<deadline-{time.monotonic_ns()}@mailworker.test>"
    message.set_content("body")
    return message


def test_smtp_exchange_trickled_after_login_ends_at_the_deadline(smtp_server, dovecot):
    user = dovecot.new_user()
    message = _message(smtp_server.username, user.address)
    # Clear text, so the proxy sees the login succeed (235) and trickles every reply after it.
    proxy = TricklingProxy(smtp_server.plain_port, interval=INTERVAL, trickle_after=b"235 ")
    with proxy:
        endpoint = smtp_server.endpoint("plain", port=proxy.port, timeout=TIMEOUT, deadline=3)
        ends_at_deadline(lambda: send_message(endpoint, message), 3)
    assert smtp_server.delivered(message["Message-ID"]) == []
    assert deadline_threads() == []


def test_smtp_starttls_handshake_trickled_ends_at_the_deadline(smtp_server, dovecot):
    user = dovecot.new_user()
    message = _message(smtp_server.username, user.address)
    # The server's "220 ... TLS" go-ahead passes; its handshake bytes then come one a second.
    with TricklingProxy(
        smtp_server.port, interval=INTERVAL, trickle_after=b"Ready to start TLS"
    ) as proxy:
        endpoint = smtp_server.endpoint(port=proxy.port, timeout=TIMEOUT, deadline=3)
        ends_at_deadline(lambda: send_message(endpoint, message), 3)


def test_smtp_greeting_trickled_ends_at_the_deadline(smtp_server, dovecot):
    user = dovecot.new_user()
    message = _message(smtp_server.username, user.address)
    with TricklingProxy(smtp_server.plain_port, interval=INTERVAL, trickling=True) as proxy:
        endpoint = smtp_server.endpoint("plain", port=proxy.port, timeout=TIMEOUT, deadline=3)
        ends_at_deadline(lambda: send_message(endpoint, message), 3)


def test_sessions_from_default_settings_carry_the_default_deadlines(app_env, make_account, dovecot):
    # Only what reaches the servers; every timing at the application's defaults.
    kept = ("BROKER_URL", "DATABASE_URL", "ENCRYPTION_KEYS", "MAIL_CA_FILE")
    env = {f"MAILWORKER_{name}": app_env[f"MAILWORKER_{name}"] for name in kept}
    settings = load_settings(env)
    assert settings.imap_deadline == float(SETTINGS["MAILWORKER_IMAP_DEADLINE"].default) == 240
    assert settings.smtp_deadline == float(SETTINGS["MAILWORKER_SMTP_DEADLINE"].default) == 900
    # The RFC 5321 wait for the final reply (10 min) fits, and the send fits the soft limit.
    assert settings.smtp_deadline > 600
    assert settings.soft_time_limit > settings.smtp_deadline + settings.imap_deadline

    account = make_account()
    access = owned_access(settings, *account.ids)
    assert (access.imap.deadline, access.smtp.deadline) == (240, 900)
    with ImapSession(access.imap) as imap:
        imap.select("INBOX")
        [timer] = [t for t in threading.enumerate() if t.name.startswith("deadline ")]
        assert timer.name == f"deadline 240 s: IMAP session with {dovecot.host}:{dovecot.port}"
    assert deadline_threads() == [], "the deadline's timer outlived its session"
