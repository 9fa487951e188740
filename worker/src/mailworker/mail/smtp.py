"""Sending one message over SMTP (implicit TLS, STARTTLS or plain) with mailworker errors.

Reply codes decide the error: 4xx and dropped connections are TransientError, 5xx and missing
extensions are PermanentError, a rejected login is AuthenticationFailed (454 stays transient).

The phases are driven one by one (MAIL, RCPT, DATA, the data, the final ".") so that a failure
is known to be before or after the message data went out. Before: the server cannot have taken
the message, so the errors above apply. A caller's `before_final_dot` runs between the data and
its final "." (the outbox records there that the point of no return is reached); whatever it
raises ends the exchange with nothing delivered. After the final "." was written, a timeout, a
dropped connection or anything else but a reply is DeliveryUnknown (RFC 5321 4.1.1.4: the
server may have accepted it): the caller must not resend blindly. The reply to the final "."
gets its own timeout (RFC 5321 4.5.3.2.6: 10 minutes), the other phases the endpoint's. A
caller's `on_accepted` runs with the result as soon as the server accepted the message, before
QUIT (the outbox commits `sent` there: a process killed during QUIT has recorded the delivery).

Connection reuse (mail/kept_connections.py, when the caller passes `sessions`): after a clean
transaction (250 to the final ".") the connection is kept for the same account and endpoint
instead of QUIT; every error above closes it. The next message on it starts at MAIL with a new
deadline; a kept connection found dead at MAIL (before any RCPT, so nothing can have been
delivered on it) is replaced by a new session once. From the accepted MAIL on, all of the above
holds unchanged, per message.

Error texts name no address (servers echo them in replies): they end up in task results.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
import smtplib
from collections.abc import Callable
from dataclasses import dataclass
from email.generator import BytesGenerator
from email.message import EmailMessage
from email.utils import getaddresses
from io import BytesIO

from mailworker.errors import AuthenticationFailed, PermanentError, TransientError
from mailworker.mail.compose import build_message
from mailworker.mail.deadline import DeadlineExceeded, DeadlineSMTP, DeadlineSMTPSSL
from mailworker.mail.endpoints import MailEndpoint
from mailworker.mail.failures import network_error
from mailworker.mail.kept_connections import (
    GOODBYE_TIMEOUT,
    KeptConnections,
    SessionKey,
    kept_for,
)

__all__ = [
    "DeliveryUnknown",
    "SendResult",
    "build_message",
    "kept_smtp_connections",
    "send_message",
]

logger = logging.getLogger(__name__)

_TEMPORARY = range(400, 500)
_REPLY_CODES = range(200, 600)  # what a complete reply to the final "." can carry
OK = 250
WILL_FORWARD = 251
START_DATA = 354
CLOSING = 421
_ADDRESS = re.compile(r"[^\s<>\"'(),;:]+@[^\s<>\"'(),;:]+")
# RFC 5321 4.5.3.2.6: "DATA Termination: 10 minutes."
RFC_FINAL_REPLY_TIMEOUT = 600.0
FINAL_DOT = b".\r\n"  # ends the data; the data itself always ends with CRLF


class DeliveryUnknown(PermanentError):
    """The exchange broke after the message data went out: the server may have taken it."""


@dataclass(frozen=True)
class SendResult:
    """What the server accepted; `refused` maps each refused recipient to the server's reply."""

    message_id: str
    accepted: tuple[str, ...]
    refused: dict[str, str]


def send_message(
    endpoint: MailEndpoint,
    message: EmailMessage,
    *,
    final_reply_timeout: float = RFC_FINAL_REPLY_TIMEOUT,
    before_final_dot: Callable[[], None] = lambda: None,
    on_accepted: Callable[[SendResult], None] = lambda _: None,
    sessions: KeptConnections | None = None,
    account: str = "",
) -> SendResult:
    """Submit `message` to the envelope recipients from its To, Cc and Bcc (Bcc is not sent).

    With `sessions`, the connection kept for (`account`, `endpoint`) is used if there is one,
    and this one is kept there after a clean transaction (mail/kept_connections.py)."""
    message_id = str(message.get("Message-ID", "")).strip()
    sender = _single_address(message, "From")
    recipients = _recipients(message)
    if not message_id or not recipients:
        raise PermanentError("message needs a Message-ID and at least one recipient")
    international = not all(address.isascii() for address in (sender, *recipients))
    where = f"SMTP server {endpoint.address}"
    key = SessionKey.of(account, endpoint) if sessions is not None and sessions.enabled else None
    try:
        smtp, carried = _begin(endpoint, sessions, key, sender, international=international)
        kept = False
        try:
            refused = _transfer(
                smtp,
                endpoint,
                message,
                recipients=recipients,
                international=international,
                final_reply_timeout=final_reply_timeout,
                before_final_dot=before_final_dot,
            )
            accepted = tuple(rcpt for rcpt in recipients if rcpt not in refused)
            result = SendResult(message_id, accepted, _replies(endpoint, refused))
            on_accepted(result)
            kept = _keep_or_quit(smtp, sessions, key, carried + 1)
        finally:
            if not kept:
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
        codes = ", ".join(sorted({reply.partition(" ")[0] for reply in replies.values()}))
        temporary = all(code in _TEMPORARY for code, _ in exc.recipients.values())
        error = TransientError if temporary else PermanentError
        raise error(f"{where} refused all {len(replies)} recipient(s) (replies {codes})") from None
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
    return result


def kept_smtp_connections(
    idle_seconds: float, max_messages: int, max_connections: int
) -> KeptConnections:
    """This process's kept SMTP connections for these bounds (mail/kept_connections.py)."""
    return kept_for(
        "smtp",
        (idle_seconds, max_messages, max_connections),
        goodbye=_quit_kept,
        drop=smtplib.SMTP.close,
    )


def _quit_kept(smtp: smtplib.SMTP) -> None:
    if smtp.sock is not None:
        smtp.sock.settimeout(GOODBYE_TIMEOUT)
    smtp.quit()


def _keep_or_quit(
    smtp: smtplib.SMTP, sessions: KeptConnections | None, key: SessionKey | None, carried: int
) -> bool:
    """After the 250 to the final ".": keep the connection for the account's next message
    (True), or QUIT. The server has the message: nothing here may turn it into a resend (a
    failing QUIT, a time limit), so nothing raises; only errors before the final "." escape."""
    with contextlib.suppress(Exception):
        if sessions is not None and key is not None and sessions.give_back(key, smtp, carried):
            return True
    with contextlib.suppress(Exception):
        smtp.quit()
    return False


def _begin(
    endpoint: MailEndpoint,
    sessions: KeptConnections | None,
    key: SessionKey | None,
    sender: str,
    *,
    international: bool,
) -> tuple[smtplib.SMTP, int]:
    """A connection whose MAIL the server accepted, and how many messages it carried before:
    the one kept under `key` if it still answers, else a new session.

    A kept connection found dead at MAIL (closed by the server, reset, timed out, or a 421)
    cannot have delivered anything: no RCPT was accepted on it. It is closed and a new session
    is opened once, within what is left of the deadline. Any other reply to MAIL counts as on
    a new connection."""
    deadline = endpoint.deadline
    taken = sessions.take(key, deadline) if sessions is not None and key is not None else None
    if taken is not None:
        smtp, carried = taken
        try:
            alive = _mail_on_kept(smtp, sender, international=international)
        except BaseException:
            smtp.close()
            raise
        if alive:
            return smtp, carried
        deadline = smtp.deadline.remaining()  # type: ignore[attr-defined]
        smtp.close()
        logger.info(
            "kept SMTP connection to %s was closed meanwhile; opening a new one", endpoint.address
        )
        if deadline <= 0:
            raise DeadlineExceeded(f"SMTP exchange with {endpoint.address} passed its deadline")
    smtp = _open(endpoint, deadline)
    try:
        if endpoint.username:
            smtp.login(endpoint.username, endpoint.password)
        _mail(smtp, sender, international=international)
    except BaseException:
        smtp.close()
        raise
    return smtp, 0


def _mail(smtp: smtplib.SMTP, sender: str, *, international: bool) -> None:
    code, reply = smtp.mail(sender, _mail_options(smtp, international=international))
    if code != OK:
        _reset(smtp, code)
        raise smtplib.SMTPSenderRefused(code, reply, sender)


def _mail_on_kept(smtp: smtplib.SMTP, sender: str, *, international: bool) -> bool:
    """MAIL on a kept connection: False if the connection turned out dead."""
    options = _mail_options(smtp, international=international)
    try:
        code, reply = smtp.mail(sender, options)
    except OSError:  # smtplib's SMTPServerDisconnected, a reset, a timeout, a TLS EOF
        return False
    if code == CLOSING or code not in _REPLY_CODES:  # a 421 on closing, a reply cut short
        return False
    if code != OK:
        _reset(smtp, code)
        raise smtplib.SMTPSenderRefused(code, reply, sender)
    return True


def _mail_options(smtp: smtplib.SMTP, *, international: bool) -> list[str]:
    smtp.ehlo_or_helo_if_needed()
    if not international:
        return []
    if not smtp.has_extn("smtputf8"):
        raise smtplib.SMTPNotSupportedError(
            "an address is not ASCII and the server does not support SMTPUTF8"
        )
    return ["SMTPUTF8", "BODY=8BITMIME"]


def _transfer(
    smtp: smtplib.SMTP,
    endpoint: MailEndpoint,
    message: EmailMessage,
    *,
    recipients: list[str],
    international: bool,
    final_reply_timeout: float,
    before_final_dot: Callable[[], None],
) -> dict[str, tuple[int, bytes]]:
    """RCPT, DATA and the data, after the accepted MAIL; the refused recipients. What smtplib's
    sendmail does, phase by phase, so that only a failure after the final "." is
    DeliveryUnknown."""
    refused: dict[str, tuple[int, bytes]] = {}
    for rcpt in recipients:
        code, reply = smtp.rcpt(rcpt)
        if code not in (OK, WILL_FORWARD):
            refused[rcpt] = (code, reply)
            if code == CLOSING:
                smtp.close()
                raise smtplib.SMTPRecipientsRefused(refused)
    if len(refused) == len(recipients):
        _reset(smtp, 0)
        raise smtplib.SMTPRecipientsRefused(refused)
    code, reply = smtp.docmd("DATA")
    if code != START_DATA:
        raise smtplib.SMTPDataError(code, reply)
    smtp.send(_wire_data(message, utf8=international))
    before_final_dot()
    smtp.send(FINAL_DOT)
    # The final "." is out: from here on the server may have the message.
    code, reply = _final_reply(smtp, endpoint, final_reply_timeout)
    if code != OK:
        raise smtplib.SMTPDataError(code, reply)
    return refused


def _final_reply(smtp: smtplib.SMTP, endpoint: MailEndpoint, timeout: float) -> tuple[int, bytes]:
    try:
        if smtp.sock is not None:
            smtp.sock.settimeout(timeout)
        code, reply = smtp.getreply()
    except Exception as exc:  # a timeout, a reset, a time limit: anything but a reply
        # smtplib turns a socket timeout into SMTPServerDisconnected("... timed out").
        if isinstance(exc, TimeoutError) or isinstance(exc.__context__, TimeoutError):
            what = f"no reply within {timeout:g} s"
        else:
            what = f"no reply ({type(exc).__name__}: {endpoint.redact(str(exc))})"
        raise DeliveryUnknown(
            f"SMTP server {endpoint.address}: {what} to the end of the message data; "
            "the server may have accepted it"
        ) from exc
    if not _REPLY_CODES.start <= code < _REPLY_CODES.stop:
        # smtplib reads a line cut short by the connection's end as code -1, 2 or 25: the
        # server may have sent "250" and accepted the message.
        raise DeliveryUnknown(
            f"SMTP server {endpoint.address}: a cut-off or malformed reply to the end of the "
            "message data; the server may have accepted it"
        )
    with contextlib.suppress(OSError):
        if smtp.sock is not None:
            smtp.sock.settimeout(endpoint.timeout)
    return code, reply


def _wire_data(message: EmailMessage, *, utf8: bool) -> bytes:
    """The message as DATA carries it: without Bcc, CRLF lines, dots stuffed; the final "."
    (FINAL_DOT) goes out apart."""
    outgoing = copy.copy(message)  # as smtplib does: `del` rebinds the copy's header list
    del outgoing["Bcc"]
    del outgoing["Resent-Bcc"]
    buffer = BytesIO()
    policy = message.policy.clone(linesep="\r\n", utf8=utf8)
    BytesGenerator(buffer, policy=policy).flatten(outgoing)
    data = re.sub(rb"(?m)^\.", b"..", buffer.getvalue())
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


def _reset(smtp: smtplib.SMTP, code: int) -> None:
    if code == CLOSING:
        smtp.close()
    else:
        with contextlib.suppress(smtplib.SMTPServerDisconnected):
            smtp.rset()


def _open(endpoint: MailEndpoint, deadline: float) -> smtplib.SMTP:
    """A connected client, upgraded to TLS when the endpoint asks for it."""
    if endpoint.security == "ssl":
        return DeadlineSMTPSSL(
            endpoint.host,
            endpoint.port,
            timeout=endpoint.timeout,
            context=endpoint.tls_context(),
            deadline=deadline,
        )
    smtp = DeadlineSMTP(endpoint.host, endpoint.port, timeout=endpoint.timeout, deadline=deadline)
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
    return endpoint.redact(f"{code} {_ADDRESS.sub('<address>', ' '.join(text.split()))}")
