"""Where a mail server lives and how to talk to it securely.

A TLS context is built once per process for each (CA bundle, verify) pair and reused by every
session: building one loads its CA bundle, 26-32 ms of CPU for the system store (Debian's
140-odd certificates; two measurements), more than the rest of an idle sync. It is rebuilt
when the bundle file changes (its size, inode or mtime: update-ca-certificates, a new
MAILWORKER_MAIL_CA_FILE), so a renewed CA needs no restart. A context is not changed once
built, and sharing one between threads is what ssl.SSLContext is for.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field
from functools import lru_cache
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
        """The client TLS context: verified by default, unverified only when asked for (shared,
        see the module docstring: do not change it)."""
        return _tls_context(self.ca_file, self.verify_tls, _bundle_version(self.ca_file))

    def redact(self, text: str) -> str:
        """`text` with the password masked, for anything built from a server's reply."""
        if len(self.password) >= _MIN_REDACTED_LENGTH:
            return text.replace(self.password, "***")
        return text


def _bundle_version(ca_file: str | None) -> tuple[int, int, int] | None:
    """What changes when the CA bundle a context would load is replaced or rewritten."""
    path = ca_file or ssl.get_default_verify_paths().cafile
    if not path:
        return None
    try:
        stat = os.stat(path)
    except OSError:  # missing: create_default_context reports it (or the store has no file)
        return None
    return (stat.st_size, stat.st_ino, stat.st_mtime_ns)


@lru_cache(maxsize=8)
def _tls_context(
    ca_file: str | None, verify_tls: bool, _version: tuple[int, int, int] | None
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca_file)
    if not verify_tls:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
