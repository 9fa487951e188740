"""An IMAP session (RFC 3501/9051) that speaks in UIDs and raises mailworker errors.

    with ImapSession(endpoint) as imap:
        state = imap.select("INBOX")
        for batch in imap.fetch_batches(after_uid=last_seen, batch_size=100):
            ...

Replies map to errors so a task knows whether to retry: a dropped connection, a timeout or a
BYE, or a NO with [UNAVAILABLE]/[INUSE]/[SERVERBUG] (RFC 5530), is a TransientError; a rejected
login is AuthenticationFailed; any other NO or BAD is a PermanentError.
"""

from __future__ import annotations

import contextlib
import imaplib
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from mailworker.errors import (
    AuthenticationFailed,
    InvalidTaskArguments,
    PermanentError,
    TransientError,
)
from mailworker.mail import imap_syntax as syntax
from mailworker.mail.deadline import DeadlineIMAP4, DeadlineIMAP4SSL
from mailworker.mail.endpoints import MailEndpoint
from mailworker.mail.failures import network_error

_TRANSIENT_CODES = frozenset({"UNAVAILABLE", "INUSE", "SERVERBUG"})
_Reply = tuple[str, list[Any]]


@dataclass(frozen=True)
class FolderState:
    """What SELECT reports: a cursor is only valid while uidvalidity stays the same."""

    uidvalidity: int
    uidnext: int
    exists: int


@dataclass(frozen=True)
class FetchedMessage:
    """One message as stored on the server, fetched without changing its flags."""

    uid: int
    raw: bytes
    flags: tuple[str, ...]


class ImapSession:
    """Connects and logs in on __enter__, logs out on __exit__."""

    def __init__(self, endpoint: MailEndpoint) -> None:
        self.endpoint = endpoint
        self.capabilities: frozenset[str] = frozenset()
        self.selected: str | None = None
        self._conn: imaplib.IMAP4 | None = None

    def __enter__(self) -> Self:
        self._conn = self._connect()
        try:
            self._login()
        except BaseException:
            with contextlib.suppress(OSError):
                self._conn.shutdown()
            self._conn = None
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        conn, self._conn = self._conn, None
        self.selected = None
        if conn is not None:
            # LOGOUT if the connection still works; closing errors must not hide the outcome.
            with contextlib.suppress(imaplib.IMAP4.error, OSError):
                conn.logout()
            with contextlib.suppress(OSError):
                conn.shutdown()

    # -- the interface the tasks use -------------------------------------------------------------

    def select(self, folder: str) -> FolderState:
        """Open `folder` read-write and report its UIDVALIDITY, UIDNEXT and message count."""
        conn = self._connection()
        self.selected = None
        data = self._ok(f"select {folder!r}", conn.select, syntax.mailbox_name(folder))
        uidvalidity = self._response_number(conn, "UIDVALIDITY")
        uidnext = self._response_number(conn, "UIDNEXT")
        if uidnext is None:  # RFC 9051 makes UIDNEXT optional in SELECT; STATUS always has it
            uidnext = self._status_uidnext(folder)
        if uidvalidity is None:
            raise PermanentError(f"IMAP server {self.endpoint.address} sent no UIDVALIDITY")
        self.selected = folder
        return FolderState(uidvalidity=uidvalidity, uidnext=uidnext, exists=int(data[0] or 0))

    def fetch_batches(self, after_uid: int, batch_size: int) -> Iterator[list[FetchedMessage]]:
        """Messages with UID > after_uid in ascending UID order, `batch_size` at a time.

        BODY.PEEK[] leaves \\Seen alone. Messages expunged by another client between the search
        and the fetch are simply absent from their batch.
        """
        _require_int("after_uid", after_uid, minimum=0)
        _require_int("batch_size", batch_size, minimum=1)
        self._require_selected()
        return self._batches(after_uid, batch_size)

    def _batches(self, after_uid: int, batch_size: int) -> Iterator[list[FetchedMessage]]:
        if after_uid >= syntax.MAX_UID:
            return
        conn = self._connection()
        data = self._ok("search", conn.uid, "SEARCH", "UID", f"{after_uid + 1}:*")
        # "n:*" always matches the highest UID, even when it is below n.
        uids = sorted(uid for uid in _numbers(data) if uid > after_uid)
        for start in range(0, len(uids), batch_size):
            wanted = uids[start : start + batch_size]
            data = self._ok(
                "fetch", conn.uid, "FETCH", syntax.uid_set(wanted), "(UID FLAGS BODY.PEEK[])"
            )
            found = {uid: (raw, flags) for uid, raw, flags in syntax.parse_fetch(data)}
            batch = [FetchedMessage(uid, *found[uid]) for uid in wanted if uid in found]
            if batch:
                yield batch

    def move(self, uids: Sequence[int], target: str) -> None:
        """Move messages to `target` (created if missing): MOVE if offered, else COPY+EXPUNGE."""
        uid_set = syntax.uid_set(uids)
        self._require_selected()
        if not uid_set or target == self.selected:
            return
        conn = self._connection()
        command = "MOVE" if "MOVE" in self.capabilities else "COPY"
        self._creating_target(
            target, f"{command.lower()} to {target!r}", conn.uid, command, uid_set
        )
        if command == "COPY":
            self._delete(uid_set)

    def expunge(self, uids: Sequence[int]) -> None:
        """Remove messages for good (\\Deleted, then UID EXPUNGE so nothing else goes with them)."""
        uid_set = syntax.uid_set(uids)
        self._require_selected()
        if uid_set:
            self._delete(uid_set)

    def append(self, folder: str, raw: bytes, flags: Sequence[str] = ()) -> None:
        """Store `raw` in `folder` (created if missing) with `flags`."""
        if not isinstance(raw, bytes) or not raw:
            raise InvalidTaskArguments("raw must be the non-empty bytes of a message")
        flag_list = syntax.flag_list(flags)
        conn = self._connection()

        def append_to(mailbox: str) -> _Reply:
            return conn.append(mailbox, flag_list, None, raw)

        self._creating_target(folder, f"append to {folder!r}", append_to)

    def search_header(self, name: str, value: str) -> list[int]:
        """UIDs in the selected folder whose header `name` contains `value` (a substring match)."""
        syntax.header_name(name)
        if not isinstance(value, str) or "\r" in value or "\n" in value:
            raise InvalidTaskArguments(f"{name} search value must be a single line of text")
        self._require_selected()
        conn = self._connection()
        if value.isascii():
            data = self._ok("search", conn.uid, "SEARCH", "HEADER", name, syntax.quote(value))
        else:
            # imaplib sends `literal` after the last argument; typeshed wrongly says str.
            conn.literal = value.encode()  # type: ignore[assignment]
            data = self._ok("search", conn.uid, "SEARCH", "CHARSET", "UTF-8", "HEADER", name)
        return sorted(_numbers(data))

    # -- connection and login --------------------------------------------------------------------

    def _connect(self) -> imaplib.IMAP4:
        endpoint = self.endpoint
        try:
            if endpoint.security == "ssl":
                return DeadlineIMAP4SSL(
                    endpoint.host,
                    endpoint.port,
                    ssl_context=endpoint.tls_context(),
                    timeout=endpoint.timeout,
                    deadline=endpoint.deadline,
                )
            conn = DeadlineIMAP4(
                endpoint.host, endpoint.port, timeout=endpoint.timeout, deadline=endpoint.deadline
            )
        except imaplib.IMAP4.error as exc:  # greeted with BYE (overloaded, shutting down)
            raise TransientError(
                f"IMAP server {endpoint.address} refused the session: {syntax.as_text(exc)}"
            ) from exc
        except OSError as exc:
            raise network_error(exc, endpoint, "IMAP") from exc
        if endpoint.security == "starttls":
            self._starttls(conn)
        return conn

    def _starttls(self, conn: imaplib.IMAP4) -> None:
        if "STARTTLS" not in conn.capabilities:
            with contextlib.suppress(OSError):
                conn.shutdown()
            raise PermanentError(
                f"IMAP server {self.endpoint.address} does not offer STARTTLS; "
                "refusing to send credentials in clear text"
            )
        try:
            conn.starttls(self.endpoint.tls_context())
        except BaseException as exc:
            with contextlib.suppress(OSError):
                conn.shutdown()
            if isinstance(exc, OSError):
                raise network_error(exc, self.endpoint, "IMAP") from exc
            if isinstance(exc, imaplib.IMAP4.error):
                raise PermanentError(
                    f"STARTTLS with IMAP server {self.endpoint.address} failed: "
                    f"{syntax.as_text(exc)}"
                ) from exc
            raise

    def _login(self) -> None:
        conn = self._connection()
        endpoint = self.endpoint
        try:
            if "AUTH=PLAIN" in conn.capabilities:
                # SASL PLAIN carries UTF-8 passwords, which LOGIN's quoted string cannot.
                secret = f"\0{endpoint.username}\0{endpoint.password}".encode()
                conn.authenticate("PLAIN", lambda _challenge: secret)
            elif "LOGINDISABLED" in conn.capabilities:
                raise PermanentError(
                    f"IMAP server {endpoint.address} disables LOGIN on this connection; "
                    "use security ssl or starttls"
                )
            else:
                conn.login(endpoint.username, endpoint.password)
        except imaplib.IMAP4.abort as exc:
            raise TransientError(self._message("login", exc)) from None
        except imaplib.IMAP4.error as exc:
            text = self._message("login", exc)
            if syntax.response_code(syntax.as_text(exc)) in _TRANSIENT_CODES:
                raise TransientError(text) from None
            raise AuthenticationFailed(text) from None
        except UnicodeEncodeError:
            raise AuthenticationFailed(
                f"IMAP server {endpoint.address} offers only LOGIN, which cannot carry "
                "a non-ASCII username or password"
            ) from None
        except OSError as exc:
            raise network_error(exc, endpoint, "IMAP") from exc
        self.capabilities = self._capabilities_after_login(conn)

    def _capabilities_after_login(self, conn: imaplib.IMAP4) -> frozenset[str]:
        # Servers announce the post-login set in the tagged OK; asking again costs a round trip.
        _, announced = conn.response("CAPABILITY")
        words = syntax.as_text(announced[-1]).split() if announced and announced[-1] else []
        if not words:
            words = syntax.as_text(self._ok("capability", conn.capability)[-1]).split()
        return frozenset(word.upper() for word in words)

    # -- helpers ---------------------------------------------------------------------------------

    def _connection(self) -> imaplib.IMAP4:
        if self._conn is None:
            raise PermanentError("ImapSession used outside its `with` block")
        return self._conn

    def _require_selected(self) -> None:
        if self.selected is None:
            raise PermanentError("no folder selected: call select() first")

    def _attempt(self, action: str, method: Callable[..., _Reply], *args: object) -> _Reply:
        """Run one imaplib call; connection trouble and BAD become errors, NO is returned."""
        try:
            return method(*args)
        except imaplib.IMAP4.readonly as exc:
            raise PermanentError(self._message(action, exc)) from exc
        except imaplib.IMAP4.abort as exc:  # BYE or a dropped connection
            raise TransientError(self._message(action, exc)) from exc
        except imaplib.IMAP4.error as exc:  # BAD, or a command not valid in this state
            raise PermanentError(self._message(action, exc)) from exc
        except OSError as exc:
            raise network_error(exc, self.endpoint, "IMAP") from exc

    def _ok(self, action: str, method: Callable[..., _Reply], *args: object) -> list[Any]:
        typ, data = self._attempt(action, method, *args)
        if typ != "OK":
            raise self._refusal(action, data)
        return data

    def _refusal(self, action: str, data: list[Any]) -> TransientError | PermanentError:
        text = syntax.as_text(data[-1] if data else "")
        message = self._message(action, text)
        if syntax.response_code(text) in _TRANSIENT_CODES:
            return TransientError(message)
        return PermanentError(message)

    def _creating_target(
        self, folder: str, action: str, method: Callable[..., _Reply], *args: object
    ) -> None:
        """Run a command whose last argument is `folder`; on NO [TRYCREATE] create it and retry."""
        mailbox = syntax.mailbox_name(folder)
        typ, data = self._attempt(action, method, *args, mailbox)
        if typ != "OK" and syntax.response_code(syntax.as_text(data[-1] if data else "")) == (
            "TRYCREATE"
        ):
            self._create(folder, mailbox)
            typ, data = self._attempt(action, method, *args, mailbox)
        if typ != "OK":
            raise self._refusal(action, data)

    def _create(self, folder: str, mailbox: str) -> None:
        conn = self._connection()
        typ, data = self._attempt(f"create {folder!r}", conn.create, mailbox)
        if typ != "OK":
            code = syntax.response_code(syntax.as_text(data[-1] if data else ""))
            if code != "ALREADYEXISTS":  # another session created it first
                raise self._refusal(f"create {folder!r}", data)
        # Subscribed, so that mail clients show the folder; failing to subscribe harms nothing.
        self._attempt(f"subscribe {folder!r}", conn.subscribe, mailbox)

    def _delete(self, uid_set: str) -> None:
        conn = self._connection()
        self._ok("store \\Deleted", conn.uid, "STORE", uid_set, "+FLAGS.SILENT", "(\\Deleted)")
        if "UIDPLUS" in self.capabilities:
            self._ok("expunge", conn.uid, "EXPUNGE", uid_set)
        else:
            # Without UIDPLUS only a plain EXPUNGE exists; it also removes messages another client
            # flagged \Deleted, which is what that client asked for anyway.
            self._ok("expunge", conn.expunge)

    def _status_uidnext(self, folder: str) -> int:
        conn = self._connection()
        data = self._ok("status", conn.status, syntax.mailbox_name(folder), "(UIDNEXT)")
        words = syntax.as_text(data[-1]).replace("(", " ").replace(")", " ").split()
        for key, value in itertools.pairwise(words):
            if key.upper() == "UIDNEXT" and value.isdigit():
                return int(value)
        raise PermanentError(f"IMAP server {self.endpoint.address} sent no UIDNEXT")

    @staticmethod
    def _response_number(conn: imaplib.IMAP4, code: str) -> int | None:
        _, values = conn.response(code)
        text = syntax.as_text(values[-1]) if values and values[-1] is not None else ""
        return int(text) if text.isdigit() else None

    def _message(self, action: str, detail: object) -> str:
        text = self.endpoint.redact(syntax.as_text(detail).strip())
        who = f"{self.endpoint.username} on {self.endpoint.address}"
        return f"IMAP {action} as {who} failed: {text}"


def _numbers(data: list[Any]) -> list[int]:
    return [int(word) for item in data if item for word in syntax.as_text(item).split()]


def _require_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidTaskArguments(f"{name} must be an integer >= {minimum}, got {value!r}")
