"""Turning socket, TLS and reply-code failures into retryable or permanent errors."""

from __future__ import annotations

import ssl

from mailworker.errors import PermanentError, TransientError
from mailworker.mail.deadline import DeadlineExceeded
from mailworker.mail.endpoints import MailEndpoint

# A dropped connection during the handshake is the network's fault; any other TLS failure (an
# unknown CA, a wrong hostname, TLS spoken to a plain port) will fail the same way next time.
_TRANSIENT_TLS_ERRORS = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)


def network_error(
    exc: OSError, endpoint: MailEndpoint, protocol: str
) -> TransientError | PermanentError:
    """The error to raise for an OSError (refused, reset, timeout, TLS) talking to `endpoint`."""
    where = f"{protocol} server {endpoint.address}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = exc.verify_message or exc.reason or "certificate rejected"
        return PermanentError(f"TLS certificate verification failed for {where}: {reason}")
    if isinstance(exc, ssl.SSLError) and not isinstance(exc, _TRANSIENT_TLS_ERRORS):
        return PermanentError(f"TLS handshake with {where} failed: {exc.reason or exc}")
    if isinstance(exc, DeadlineExceeded):
        return TransientError(str(exc))
    if isinstance(exc, TimeoutError):
        return TransientError(f"{where} did not answer within {endpoint.timeout:g} s")
    if isinstance(exc, ConnectionRefusedError):
        return TransientError(f"{where} refused the connection")
    detail = endpoint.redact(exc.strerror or str(exc) or type(exc).__name__)
    return TransientError(f"cannot talk to {where}: {detail}")
