"""Where a mail server lives and how to talk to it securely."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Literal

from mailworker.errors import PermanentError

Security = Literal["ssl", "starttls", "plain"]
SECURITY_MODES: tuple[Security, ...] = ("ssl", "starttls", "plain")

# Redacting very short passwords would mangle ordinary words in server replies.
_MIN_REDACTED_LENGTH = 3


@dataclass(frozen=True)
class MailEndpoint:
    """One account on one IMAP or SMTP server.

    `timeout` bounds each network wait, `deadline` the whole session (seconds).
    `security` is "ssl" (implicit TLS), "starttls" (upgrade before authenticating, refused if the
    server does not offer it) or "plain" (no TLS at all, for loopback and labs only).
    The password never appears in repr() or in any error the mail modules raise.
    """

    host: str
    port: int
    security: Security
    username: str
    password: str = field(repr=False)
    timeout: float = 30.0
    # Wall-clock limit of one whole session (mail/deadline.py); services pass the setting.
    deadline: float = 900.0
    verify_tls: bool = True
    ca_file: str | None = None

    def __post_init__(self) -> None:
        # An account stored with bad connection data fails the same way on every retry.
        if self.security not in SECURITY_MODES:
            raise PermanentError(
                f"mail endpoint {self.host}: security must be one of {', '.join(SECURITY_MODES)}"
            )
        if not 0 < self.port < 65536:  # noqa: PLR2004
            raise PermanentError(f"mail endpoint {self.host}: port {self.port} is not 1-65535")
        if self.timeout <= 0:
            raise PermanentError(f"mail endpoint {self.host}: timeout must be positive")
        if self.deadline <= 0:
            raise PermanentError(f"mail endpoint {self.host}: deadline must be positive")

    @property
    def address(self) -> str:
        """host:port, for messages."""
        return f"{self.host}:{self.port}"

    def tls_context(self) -> ssl.SSLContext:
        """The client TLS context: verified by default, unverified only when asked for."""
        context = ssl.create_default_context(cafile=self.ca_file)
        if not self.verify_tls:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def redact(self, text: str) -> str:
        """`text` with the password masked, for anything built from a server's reply."""
        if len(self.password) >= _MIN_REDACTED_LENGTH:
            return text.replace(self.password, "***")
        return text
