"""Sending one message over SMTP (implicit TLS, STARTTLS or plain) with mailworker errors.

Reply codes decide the error: 4xx and dropped connections are TransientError, 5xx and missing
extensions are PermanentError, a rejected login is AuthenticationFailed (454 stays transient).

One case no client can settle: the connection dies after the message data went out but before
the server's final reply. The message may or may not have been accepted; the error is transient,
so idempotency by Message-ID belongs to the caller (the send task records what it sent).
"""

from __future__ import annotations

import contextlib
import smtplib
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import getaddresses

from mailworker.errors import AuthenticationFailed, PermanentError, TransientError
from mailworker.mail.compose import build_message
from mailworker.mail.deadline import DeadlineSMTP, DeadlineSMTPSSL
from mailworker.mail.endpoints import MailEndpoint
from mailworker.mail.failures import network_error

__all__ = ["SendResult", "build_message", "send_message"]

_TEMPORARY = range(400, 500)


@dataclass(frozen=True)
class SendResult:
    """What the server accepted; `refused` maps each refused recipient to the server's reply."""

    message_id: str
    accepted: tuple[str, ...]
    refused: dict[str, str]


def send_message(endpoint: MailEndpoint, message: EmailMessage) -> SendResult:
    """Submit `message` to the envelope recipients from its To, Cc and Bcc (Bcc is not sent)."""
    message_id = str(message.get("Message-ID", "")).strip()
    sender = _single_address(message, "From")
    recipients = _recipients(message)
    if not message_id or not recipients:
        raise PermanentError("message needs a Message-ID and at least one recipient")
    where = f"SMTP server {endpoint.address}"
    try:
        smtp = _open(endpoint)
        try:
            if endpoint.username:
                smtp.login(endpoint.username, endpoint.password)
            refused = smtp.send_message(message, from_addr=sender, to_addrs=recipients)
            # The server has the message: a failing QUIT must not turn this into a resend.
            with contextlib.suppress(smtplib.SMTPException, OSError):
                smtp.quit()
        finally:
            smtp.close()
    except smtplib.SMTPAuthenticationError as exc:
        text = _reply_text(endpoint, exc.smtp_code, exc.smtp_error)
        if exc.smtp_code in _TEMPORARY:
            raise TransientError(f"{where} deferred the login: {text}") from None
        raise AuthenticationFailed(
            f"{where} rejected the login of {endpoint.username}: {text}"
        ) from None
    except smtplib.SMTPRecipientsRefused as exc:
        replies = _replies(endpoint, exc.recipients)
        listed = "; ".join(f"{rcpt}: {reply}" for rcpt, reply in replies.items())
        temporary = all(code in _TEMPORARY for code, _ in exc.recipients.values())
        error = TransientError if temporary else PermanentError
        raise error(f"{where} refused every recipient: {listed}") from None
    except smtplib.SMTPResponseException as exc:
        text = _reply_text(endpoint, exc.smtp_code, exc.smtp_error)
        error = TransientError if exc.smtp_code in _TEMPORARY else PermanentError
        raise error(f"{where} refused the message: {text}") from None
    except smtplib.SMTPServerDisconnected as exc:
        raise TransientError(f"{where} closed the connection: {endpoint.redact(str(exc))}") from exc
    except smtplib.SMTPNotSupportedError as exc:
        raise PermanentError(f"{where}: {endpoint.redact(str(exc))}") from exc
    except smtplib.SMTPException as exc:
        raise PermanentError(f"{where} failed: {endpoint.redact(str(exc))}") from exc
    except OSError as exc:
        raise network_error(exc, endpoint, "SMTP") from exc
    accepted = tuple(rcpt for rcpt in recipients if rcpt not in refused)
    return SendResult(message_id, accepted, _replies(endpoint, refused))


def _open(endpoint: MailEndpoint) -> smtplib.SMTP:
    """A connected client, upgraded to TLS when the endpoint asks for it."""
    if endpoint.security == "ssl":
        return DeadlineSMTPSSL(
            endpoint.host,
            endpoint.port,
            timeout=endpoint.timeout,
            context=endpoint.tls_context(),
            deadline=endpoint.deadline,
        )
    smtp = DeadlineSMTP(
        endpoint.host, endpoint.port, timeout=endpoint.timeout, deadline=endpoint.deadline
    )
    if endpoint.security == "starttls":
        try:
            smtp.ehlo()
            if not smtp.has_extn("starttls"):
                raise PermanentError(
                    f"SMTP server {endpoint.address} does not offer STARTTLS; "
                    "refusing to send credentials in clear text"
                )
            smtp.starttls(context=endpoint.tls_context())
        except BaseException:
            smtp.close()
            raise
    return smtp


def _single_address(message: EmailMessage, header: str) -> str:
    found = [addr for _, addr in getaddresses(message.get_all(header, [])) if addr]
    if len(found) != 1:
        raise PermanentError(f"message needs exactly one {header} address, found {len(found)}")
    return found[0]


def _recipients(message: EmailMessage) -> list[str]:
    headers = [str(value) for name in ("To", "Cc", "Bcc") for value in message.get_all(name, [])]
    unique: dict[str, None] = {}
    for _, addr in getaddresses(headers):
        if addr:
            unique.setdefault(addr, None)
    return list(unique)


def _replies(endpoint: MailEndpoint, replies: dict[str, tuple[int, bytes]]) -> dict[str, str]:
    return {rcpt: _reply_text(endpoint, code, text) for rcpt, (code, text) in replies.items()}


def _reply_text(endpoint: MailEndpoint, code: int, reply: bytes | str) -> str:
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)
    return endpoint.redact(f"{code} {' '.join(text.split())}")
