"""A wall-clock deadline for one IMAP session or SMTP exchange, whatever the pool runs it.

A socket timeout bounds each read, not the whole: a server that sends one byte every 29 s never
trips a 30 s timeout, and Celery's time limits do not run on the threads pool that runs send and
sync. So every mail connection starts a deadline when it opens. When the deadline passes, a timer
shuts the connection's socket down (SHUT_RDWR): a read or write blocked in another thread returns
at once, and the client raises DeadlineExceeded, a TimeoutError whose message names the deadline
(the mail modules turn it into a TransientError like any other timeout). A connection kept
between tasks (mail/kept_connections.py) has its deadline paused while it waits and restarted,
at full length, for each exchange: the deadline bounds one exchange, not the connection's life.

The timer holds a duplicate of the socket's descriptor. shutdown() acts on the socket, not the
descriptor, so it also reaches the connection after a TLS wrap (implicit TLS or STARTTLS replace
the socket object, not the socket), and a descriptor number that another connection reuses after
this one closed can never be hit.

    conn = DeadlineIMAP4(host, port, timeout=30, deadline=240)   # instead of imaplib.IMAP4
    smtp = DeadlineSMTP(host, port, timeout=30, deadline=900)    # instead of smtplib.SMTP
"""

from __future__ import annotations

import contextlib
import imaplib
import smtplib
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = [
    "Deadline",
    "DeadlineExceeded",
    "DeadlineIMAP4",
    "DeadlineIMAP4SSL",
    "DeadlineSMTP",
    "DeadlineSMTPSSL",
]

_T = TypeVar("_T")


class DeadlineExceeded(TimeoutError):
    """The whole session took longer than its deadline (the socket was shut down)."""


class Deadline:
    """`seconds` from now; at that moment the watched socket is shut down.

    `cancel()` when the connection closes (the client classes below do it in shutdown/close).
    A deadline never cancelled still ends by itself: it fires, shuts its socket down and lets go.
    """

    def __init__(self, seconds: float, what: str) -> None:
        if not seconds > 0:
            raise ValueError(f"deadline of {what} must be positive, got {seconds!r}")
        self.seconds = seconds
        self.what = what
        self._expires = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._watched: socket.socket | None = None
        self._fired = False
        self._cancelled = False
        self._generation = 0  # which timer may fire: pause() and restart() retire the old one
        self._timer = self._new_timer(seconds)
        self._timer.start()

    @property
    def expired(self) -> bool:
        return self._fired or time.monotonic() >= self._expires

    def remaining(self) -> float:
        """Seconds left (0 once expired), for callers that can stop cleanly between steps."""
        return max(0.0, self._expires - time.monotonic())

    def message(self) -> str:
        return f"{self.what} passed its deadline of {self.seconds:g} s"

    def watch(self, sock: socket.socket) -> None:
        """Shut `sock` (and every TLS wrap of it) down when the deadline passes."""
        duplicate = sock.dup()
        with self._lock:
            if self._cancelled:
                previous = duplicate  # the connection is already closed: nothing to watch
            else:
                previous, self._watched = self._watched, duplicate
            fired = self._fired
        if previous is not None:
            previous.close()
        if fired:
            self._fire()

    def check(self, cause: BaseException | None = None) -> None:
        """Raise DeadlineExceeded (from `cause`) if the deadline has passed."""
        if self.expired:
            raise DeadlineExceeded(self.message()) from cause

    def guard(
        self, call: Callable[..., _T], complete: Callable[[_T], bool], *args: Any, **kwargs: Any
    ) -> _T:
        """`call(...)`; a failure, or a read cut short (not `complete`), after the deadline
        is DeadlineExceeded: the shutdown ends a read with EOF, possibly mid-line."""
        try:
            result = call(*args, **kwargs)
        except DeadlineExceeded:
            raise
        except OSError as exc:  # what a shut-down socket raises (smtplib's errors are OSErrors)
            self.check(exc)
            raise
        # A whole reply is kept even if the deadline passed while it was read: an accepted
        # message must not be reported as failed.
        if not complete(result):
            self.check()
        return result

    def pause(self) -> None:
        """Stop the clock and keep watching: a connection kept idle between two exchanges
        (mail/kept_connections.py) has no deadline until `restart`."""
        with self._lock:
            self._generation += 1
            self._expires = float("inf")
            timer = self._timer
        timer.cancel()

    def restart(self, seconds: float) -> bool:
        """A new deadline, `seconds` from now, on the same socket (the next exchange on a kept
        connection); False if this one already fired or was cancelled (the socket is gone)."""
        if not seconds > 0:
            raise ValueError(f"deadline of {self.what} must be positive, got {seconds!r}")
        with self._lock:
            if self._fired or self._cancelled:
                return False
            self._generation += 1
            old, self._timer = self._timer, self._new_timer(seconds)
            self.seconds = seconds
            self._expires = time.monotonic() + seconds
            self._timer.start()
        old.cancel()
        return True

    def cancel(self) -> None:
        self._timer.cancel()
        with self._lock:
            self._cancelled = True
            watched, self._watched = self._watched, None
        if watched is not None:
            watched.close()

    def _new_timer(self, seconds: float) -> threading.Timer:
        timer = threading.Timer(seconds, self._fire, args=(self._generation,))
        timer.daemon = True
        timer.name = f"deadline {seconds:g} s: {self.what}"
        return timer

    def _fire(self, generation: int | None = None) -> None:
        with self._lock:
            if generation is not None and generation != self._generation:
                return  # a timer that pause() or restart() retired, firing late
            self._fired = True
            watched, self._watched = self._watched, None
        if watched is not None:
            with contextlib.suppress(OSError):  # already closed by the peer or the client
                watched.shutdown(socket.SHUT_RDWR)
            watched.close()


def _always(_result: object) -> bool:
    return True


def _whole_line(line: bytes) -> bool:
    return line.endswith(b"\n")


def _reply_code(reply: tuple[int, bytes]) -> bool:
    return 100 <= reply[0] <= 599  # noqa: PLR2004 - the range of SMTP reply codes


class _Deadlined:
    """A client (imaplib or smtplib) with a deadline from construction: connect, TLS, greeting
    and STARTTLS included. `what` names the session in the error."""

    what: str
    deadline: Deadline

    def __init__(self, host: str, port: int, *args: Any, deadline: float, **kwargs: Any) -> None:
        self.deadline = Deadline(deadline, f"{self.what} with {host}:{port}")
        try:
            super().__init__(host, port, *args, **kwargs)  # type: ignore[call-arg]
        except BaseException as exc:
            self.deadline.cancel()
            if isinstance(exc, OSError):  # e.g. a TLS handshake the shutdown cut short
                self.deadline.check(exc)
            raise

    def starttls(self, *args: Any, **kwargs: Any) -> Any:
        return self.deadline.guard(super().starttls, _always, *args, **kwargs)  # type: ignore[misc]


class _DeadlineIMAP(_Deadlined):
    """imaplib.IMAP4 behaviour with a deadline."""

    what = "IMAP session"

    def readline(self) -> bytes:
        return self.deadline.guard(super().readline, _whole_line)  # type: ignore[misc]

    def read(self, size: int) -> bytes:
        return self.deadline.guard(super().read, lambda data: len(data) == size, size)  # type: ignore[misc]

    def send(self, data: bytes) -> None:
        try:
            super().send(data)  # type: ignore[misc]
        except OSError as exc:
            self.deadline.check(exc)
            raise

    def shutdown(self) -> None:
        self.deadline.cancel()
        super().shutdown()  # type: ignore[misc]


class DeadlineIMAP4(_DeadlineIMAP, imaplib.IMAP4):
    """imaplib.IMAP4 whose whole session ends `deadline` seconds after it began."""

    def _create_socket(self, timeout: float | None) -> socket.socket:
        sock = super()._create_socket(timeout)  # type: ignore[misc]
        self.deadline.watch(sock)
        return sock


class DeadlineIMAP4SSL(_DeadlineIMAP, imaplib.IMAP4_SSL):
    """imaplib.IMAP4_SSL whose whole session, TLS handshake included, ends at `deadline`."""

    def _create_socket(self, timeout: float | None) -> socket.socket:
        # IMAP4_SSL's own version, with the plain socket watched before the handshake.
        sock = imaplib.IMAP4._create_socket(self, timeout)  # type: ignore[attr-defined]
        self.deadline.watch(sock)
        return self.ssl_context.wrap_socket(sock, server_hostname=self.host)


class _DeadlineSMTP(_Deadlined):
    """smtplib.SMTP behaviour with a deadline."""

    what = "SMTP exchange"

    def getreply(self) -> tuple[int, bytes]:
        # smtplib reads a line cut short by EOF as code -1 (or a 1- or 2-digit code).
        return self.deadline.guard(super().getreply, _reply_code)  # type: ignore[misc]

    def send(self, s: bytes | str) -> None:
        try:
            super().send(s)  # type: ignore[misc]
        except OSError as exc:  # smtplib's SMTPServerDisconnected is an OSError too
            self.deadline.check(exc)
            raise

    def close(self) -> None:
        self.deadline.cancel()
        super().close()  # type: ignore[misc]


class DeadlineSMTP(_DeadlineSMTP, smtplib.SMTP):
    """smtplib.SMTP whose whole exchange ends `deadline` seconds after it began."""

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock = super()._get_socket(host, port, timeout)
        self.deadline.watch(sock)
        return sock


class DeadlineSMTPSSL(_DeadlineSMTP, smtplib.SMTP_SSL):
    """smtplib.SMTP_SSL whose whole exchange, TLS handshake included, ends at `deadline`."""

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        # SMTP_SSL's own version, with the plain socket watched before the handshake.
        sock = smtplib.SMTP._get_socket(self, host, port, timeout)  # type: ignore[attr-defined]
        self.deadline.watch(sock)
        return self.context.wrap_socket(sock, server_hostname=self._host)
