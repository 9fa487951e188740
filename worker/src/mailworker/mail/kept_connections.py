"""Authenticated mail connections kept per account between tasks, in this process.

Opening a session costs more than a small message: TCP, TLS and AUTH for SMTP (EHLO twice),
TLS and LOGIN for IMAP. A protocol module takes a kept connection from here before its work and
gives it back only when that work ended cleanly: for SMTP, the server answered 250 to the final
"." (the transaction is over, RFC 5321 4.1.1.4; mail/smtp.py); for IMAP, the APPEND of the Sent
copy was answered OK (mail/imap.py). Any error, timeout or unexpected reply closes the
connection instead. One cache per protocol (`kind`) and bounds.

- Who may share: a connection is kept under its key, the account AND the endpoint (host, port,
  security, username, TLS verification and CA file) AND a keyed digest of the password. A
  changed password or server never finds an old session; two accounts never share one, even on
  the same relay with the same login.
- Threads: a kept connection is either idle here (nobody uses it) or taken by exactly one
  thread; take and give_back hand it over under a lock.
- Processes: a connection never survives a fork. A child forgets every connection its parent
  kept (an at-fork hook drops them without a word on the wire: they are the parent's), and each
  cache also checks that it is used in the process that made it.
- Bounds: a connection idle for IDLE seconds is closed (the protocol's goodbye: QUIT, LOGOUT)
  by a reaper thread, one that has done MAX_MESSAGES messages is closed when it comes back, and
  at most MAX_CONNECTIONS idle ones are kept per process and protocol (a connection that comes
  back to a full cache is closed).
- Deadlines: the per-session deadline (mail/deadline.py) is paused while a connection waits
  here and started afresh, at its full length, when one is taken.
- Shutdown: close_all_kept() says goodbye to every idle connection (the tasks connect it to
  Celery's worker_process_shutdown and worker_shutdown signals).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mailworker.mail.endpoints import MailEndpoint

__all__ = ["GOODBYE_TIMEOUT", "KeptConnections", "SessionKey", "close_all_kept", "kept_for"]

# Seconds a goodbye (QUIT, LOGOUT) to a connection being retired may take: nobody waits for it.
GOODBYE_TIMEOUT = 5.0
# A random key per process for the password digests: a digest in memory (or in a core dump)
# cannot be matched against a list of guessed passwords' plain hashes.
_DIGEST_KEY = secrets.token_bytes(32)


@dataclass(frozen=True)
class SessionKey:
    """Which sends may share a connection (see the module docstring); no password in it."""

    account: str
    host: str
    port: int
    security: str
    username: str
    password_digest: bytes
    verify_tls: bool
    ca_file: str | None

    @classmethod
    def of(cls, account: str, endpoint: MailEndpoint) -> SessionKey:
        digest = hmac.new(_DIGEST_KEY, endpoint.password.encode(), hashlib.sha256).digest()
        return cls(
            account,
            endpoint.host,
            endpoint.port,
            endpoint.security,
            endpoint.username,
            digest,
            endpoint.verify_tls,
            endpoint.ca_file,
        )


@dataclass
class _Idle:
    key: SessionKey
    conn: Any  # a client of mail/deadline.py (it has a `deadline`)
    messages: int  # messages it carried
    until: float  # monotonic time it is closed at unless taken


class KeptConnections:
    """The idle connections of one protocol in one process (see the module docstring).
    `goodbye(conn)` ends a connection politely (QUIT, LOGOUT; it gets GOODBYE_TIMEOUT and may
    raise), `drop(conn)` closes it without a word. `idle_seconds` of 0 keeps none: every task
    opens and closes its own session."""

    def __init__(
        self,
        idle_seconds: float,
        max_messages: int,
        max_connections: int,
        *,
        goodbye: Callable[[Any], None],
        drop: Callable[[Any], None],
    ) -> None:
        self.idle_seconds = idle_seconds
        self.max_messages = max_messages
        self.max_connections = max_connections
        self._goodbye = goodbye
        self._drop = drop
        self._pid = os.getpid()
        self._lock = threading.Condition()
        self._idle: list[_Idle] = []  # oldest first
        self._retiring: list[Any] = []  # for the reaper to say goodbye to
        self._reaper: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.idle_seconds > 0 and self.max_messages > 1 and self.max_connections > 0

    def take(self, key: SessionKey, deadline: float) -> tuple[Any, int] | None:
        """An idle connection kept under `key` and the messages it carried, its deadline
        restarted at `deadline` seconds; None if there is none."""
        if os.getpid() != self._pid:
            return None
        with self._lock:
            now = time.monotonic()
            for index in range(len(self._idle) - 1, -1, -1):  # the most recently used first
                entry = self._idle[index]
                if entry.key != key:
                    continue
                del self._idle[index]
                if entry.until <= now or not entry.conn.deadline.restart(deadline):
                    self._retire(entry.conn)
                    continue
                return entry.conn, entry.messages
        return None

    def give_back(self, key: SessionKey, conn: Any, messages: int) -> bool:
        """Keep `conn`, whose last work ended cleanly and which has carried `messages`
        messages; False (the caller closes it) if it may not be kept."""
        if not self.enabled or os.getpid() != self._pid or messages >= self.max_messages:
            return False
        with self._lock:
            if len(self._idle) >= self.max_connections:
                return False
            conn.deadline.pause()
            until = time.monotonic() + self.idle_seconds
            self._idle.append(_Idle(key, conn, messages, until))
            self._start_reaper()
            self._lock.notify()
        return True

    def idle_count(self, key: SessionKey | None = None) -> int:
        """Idle connections kept (under `key`)."""
        with self._lock:
            return sum(1 for entry in self._idle if key is None or entry.key == key)

    def close_all(self) -> None:
        """Say goodbye to every idle connection now (worker shutdown); connections in use are
        left alone."""
        if os.getpid() != self._pid:
            return
        with self._lock:
            closing = [entry.conn for entry in self._idle] + self._retiring
            self._idle.clear()
            self._retiring.clear()
        for conn in closing:
            self._end(conn)

    # -- the reaper: ends expired and retired connections, away from the task threads

    def _retire(self, conn: Any) -> None:
        self._retiring.append(conn)
        self._start_reaper()
        self._lock.notify()

    def _start_reaper(self) -> None:
        if self._reaper is None or not self._reaper.is_alive():
            self._reaper = threading.Thread(
                target=self._reap, name="kept-connections-reaper", daemon=True
            )
            self._reaper.start()

    def _reap(self) -> None:
        while True:
            with self._lock:
                now = time.monotonic()
                expired = [entry for entry in self._idle if entry.until <= now]
                self._idle = [entry for entry in self._idle if entry.until > now]
                closing = [entry.conn for entry in expired] + self._retiring
                self._retiring = []
                if not closing:
                    if not self._idle:
                        self._reaper = None
                        return
                    self._lock.wait(min(entry.until for entry in self._idle) - now)
                    continue
            for conn in closing:
                self._end(conn)

    def _end(self, conn: Any) -> None:
        """Goodbye within GOODBYE_TIMEOUT (the deadline shuts the socket down after it),
        whatever the server does, then close."""
        with contextlib.suppress(Exception):
            if conn.deadline.restart(GOODBYE_TIMEOUT):
                self._goodbye(conn)
        with contextlib.suppress(Exception):
            self._drop(conn)


_registry: dict[tuple[str, float, int, int], KeptConnections] = {}
_registry_lock = threading.Lock()


def kept_for(
    kind: str,
    bounds: tuple[float, int, int],
    *,
    goodbye: Callable[[Any], None],
    drop: Callable[[Any], None],
) -> KeptConnections:
    """This process's cache of `kind` ("smtp", "imap") connections for these `bounds` (idle
    seconds, messages per connection, idle connections), made on first use; a process that
    loads settings with other bounds (tests) gets another."""
    name = (kind, *bounds)
    with _registry_lock:
        found = _registry.get(name)
        if found is None or found._pid != os.getpid():
            found = _registry[name] = KeptConnections(*bounds, goodbye=goodbye, drop=drop)
        return found


def close_all_kept() -> None:
    """Say goodbye to every idle connection of this process (at worker shutdown; best
    effort)."""
    with _registry_lock:
        caches = list(_registry.values())
    for cache in caches:
        with contextlib.suppress(Exception):
            cache.close_all()


def _forget_after_fork() -> None:
    """In a new child: the parent's connections are the parent's. Forgotten, not ended (a
    goodbye would end the parent's session; letting go of them only closes this process's
    copies of the sockets), and the lock made anew (a thread of the parent may have held it)."""
    global _registry_lock  # noqa: PLW0603 - module state by design: one registry per process
    _registry_lock = threading.Lock()
    _registry.clear()


os.register_at_fork(after_in_child=_forget_after_fork)
