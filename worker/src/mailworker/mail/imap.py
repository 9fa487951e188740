"""An IMAP session (RFC 3501/9051) that speaks in UIDs and raises mailworker errors.

    with ImapSession(endpoint) as imap:
        state = imap.select("INBOX")
        for batch in imap.fetch_batches(after_uid=last_seen, batch_size=100):
            ...

Replies map to errors so a task knows whether to retry: a dropped connection, a timeout or a
BYE, or a NO with [UNAVAILABLE]/[INUSE]/[SERVERBUG] (RFC 5530), is a TransientError; a rejected
login is AuthenticationFailed; any other NO or BAD is a PermanentError.

`kept_imap_session(endpoint, kept, account)` is an ImapSession that may be one kept from an
earlier task of the same account (mail/kept_connections.py: the Sent copy of each send would
otherwise log in and out every time): a kept session that does not answer a NOOP is replaced by
a new one, and the session is kept again only if its block ended without an error and with no
folder selected.
"""

from __future__ import annotations

import contextlib
import dataclasses
import imaplib
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TypeVar

from mailworker.errors import (
    AuthenticationFailed,
    InvalidTaskArguments,
    PermanentError,
    TransientError,
)
from mailworker.mail import imap_replies as replies
from mailworker.mail import imap_syntax as syntax
from mailworker.mail.deadline import Deadline, DeadlineIMAP4, DeadlineIMAP4SSL
from mailworker.mail.endpoints import MailEndpoint
from mailworker.mail.failures import network_error
from mailworker.mail.kept_connections import GOODBYE_TIMEOUT, KeptConnections, SessionKey, kept_for
from mailworker.mail.memory_budget import MemoryBudget

_TRANSIENT_CODES = frozenset({"UNAVAILABLE", "INUSE", "SERVERBUG"})
_Reply = tuple[str, list[Any]]
_T = TypeVar("_T")
_BODY_ITEMS = "(UID FLAGS BODY.PEEK[])"
# UIDs whose sizes one command asks for: one short line each, so a reply of about 50 KB.
_SIZES_PER_COMMAND = 1000


@dataclass(frozen=True)
class FolderState:
    """What SELECT reports: a cursor is only valid while uidvalidity stays the same."""

    uidvalidity: int
    uidnext: int
    exists: int


@dataclass(frozen=True)
class FetchedMessage:
    """One message as stored on the server, fetched without changing its flags.

    `raw` is None for a message larger than the caller's `max_size`: it was never fetched, and
    `size` is the size the server reported for it (RFC822.SIZE).
    """

    uid: int
    raw: bytes | None
    flags: tuple[str, ...]
    size: int

    @property
    def skipped(self) -> bool:
        return self.raw is None


@dataclass(frozen=True)
class ListedMessage:
    """A message known by UID, size and flags only, before its body is fetched."""

    uid: int
    size: int
    flags: tuple[str, ...]


class ImapSession:
    """Connects and logs in on __enter__, logs out on __exit__."""

    def __init__(self, endpoint: MailEndpoint) -> None:
        self.endpoint = endpoint
        self.capabilities: frozenset[str] = frozenset()
        self.selected: str | None = None
        self.read_only = False  # the selected folder was opened with EXAMINE
        # fetch_batches has asked the server for its last batch: the rest needs no server.
        self.fetched_all = False
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

    def close(self) -> None:
        """LOGOUT if the connection still works, and close (what leaving the block does)."""
        self.__exit__(None, None, None)

    @property
    def deadline(self) -> Deadline:
        """The session's deadline (mail/kept_connections.py pauses and restarts it)."""
        conn = self._connection()
        assert isinstance(conn, DeadlineIMAP4 | DeadlineIMAP4SSL)
        return conn.deadline

    # -- the interface the tasks use -------------------------------------------------------------

    def select(self, folder: str, *, readonly: bool = False) -> FolderState:
        """Open `folder` and report its UIDVALIDITY, UIDNEXT and message count: read-write
        (SELECT), or with `readonly` EXAMINE, which changes nothing in the folder (a reader's
        SELECT takes the \\Recent flag of new messages from every other client) and refuses
        move() and expunge()."""
        conn = self._connection()
        self.selected = None
        command = "examine" if readonly else "select"
        data = self._ok(f"{command} {folder!r}", conn.select, syntax.mailbox_name(folder), readonly)
        uidvalidity = self._response_number(conn, "UIDVALIDITY")
        uidnext = self._response_number(conn, "UIDNEXT")
        if uidnext is None:  # RFC 9051 makes UIDNEXT optional in SELECT; STATUS always has it
            uidnext = self._status_uidnext(folder)
        if uidvalidity is None:
            raise PermanentError(f"IMAP server {self.endpoint.address} sent no UIDVALIDITY")
        self.selected = folder
        self.read_only = readonly
        return FolderState(uidvalidity=uidvalidity, uidnext=uidnext, exists=int(data[0] or 0))

    def fetch_batches(
        self,
        after_uid: int,
        batch_size: int,
        *,
        batch_bytes: int | None = None,
        max_size: int | None = None,
        budget: MemoryBudget | None = None,
    ) -> Iterator[list[FetchedMessage]]:
        """Messages with UID > after_uid in ascending UID order, in batches.

        A batch holds at most `batch_size` messages and at most `batch_bytes` of message text,
        unless one message alone is larger. Sizes are asked for first (RFC822.SIZE); a message
        larger than `max_size` is never fetched and comes with raw=None. BODY.PEEK[] leaves
        \\Seen alone.

        With a `budget`, each batch's listed bytes are reserved before its bodies are fetched
        and released when the caller asks for the next batch or closes the iterator (close it,
        e.g. with contextlib.closing, so an error in the caller does not keep them held).

        `fetched_all` is True while the iterator holds its last batch: nothing more will be
        asked of the server, so a caller may close the session before storing that batch.

        A message expunged by another client after the search is left out. One the server still
        has but did not return, or returned without a body, raises TransientError once the
        messages before it have been yielded: a caller that stores each batch and then moves
        its cursor never moves it past a message it does not have.
        """
        _require_int("after_uid", after_uid, minimum=0)
        _require_int("batch_size", batch_size, minimum=1)
        if batch_bytes is not None:
            _require_int("batch_bytes", batch_bytes, minimum=1)
        if max_size is not None:
            _require_int("max_size", max_size, minimum=1)
        self._require_selected()
        self.fetched_all = False
        return self._batches(after_uid, batch_size, batch_bytes, max_size, budget)

    def _batches(
        self,
        after_uid: int,
        batch_size: int,
        batch_bytes: int | None,
        max_size: int | None,
        budget: MemoryBudget | None,
    ) -> Iterator[list[FetchedMessage]]:
        if after_uid >= syntax.MAX_UID:
            return
        # "n:*" always matches the highest UID, even when it is below n.
        uids = [uid for uid in self._search_uids(f"{after_uid + 1}:*") if uid > after_uid]
        for start in range(0, len(uids), _SIZES_PER_COMMAND):
            listed, error = self._list(uids[start : start + _SIZES_PER_COMMAND])
            last_list = error is not None or start + _SIZES_PER_COMMAND >= len(uids)
            plans = list(plan_batches(listed, batch_size, batch_bytes, max_size))  # UIDs, sizes
            for index, plan in enumerate(plans):
                planned = sum(item.size for item in plan if not _too_large(item.size, max_size))
                with budget.reserve(planned) if budget is not None else contextlib.nullcontext():
                    batch, error_in_batch = self._fetch_bodies(plan, max_size)
                    self.fetched_all = error_in_batch is not None or (
                        last_list and index == len(plans) - 1
                    )
                    if batch:
                        yield batch
                    # Hold no batch while the next one is fetched: the caller has stored it.
                    del batch
                if error_in_batch is not None:
                    raise error_in_batch
            if error is not None:
                raise error

    def _list(self, uids: list[int]) -> tuple[list[ListedMessage], TransientError | None]:
        """Size and flags of `uids`, up to the first one the server still has but did not list."""
        data = self._fetch(uids, "(UID RFC822.SIZE FLAGS)")
        answered = {
            response.uid: response
            for response in self._read(replies.parse_fetch, data)
            if response.uid is not None and response.size is not None
        }
        listed: list[ListedMessage] = []
        gone = self._gone([uid for uid in uids if uid not in answered])
        for uid in uids:
            if uid in gone:
                continue
            response = answered.get(uid)
            if response is None:
                return listed, self._unanswered(uid, "its size")
            listed.append(ListedMessage(uid, response.size or 0, response.flags or ()))
        return listed, None

    def _fetch_bodies(
        self, plan: list[ListedMessage], max_size: int | None
    ) -> tuple[list[FetchedMessage], TransientError | None]:
        """The planned batch, up to the first message the server still has but did not send."""
        wanted = [item.uid for item in plan if not _too_large(item.size, max_size)]
        bodies: dict[int, bytes] = {}
        flags: dict[int, tuple[str, ...]] = {}
        if wanted:
            asked = set(wanted)
            for response in self._read(replies.parse_fetch, self._fetch(wanted, _BODY_ITEMS)):
                if response.uid not in asked:  # unsolicited: another message's flags changed
                    continue
                if response.flags is not None:
                    flags[response.uid] = response.flags
                if response.body is not None:
                    bodies[response.uid] = response.body
        gone = self._gone([uid for uid in wanted if uid not in bodies])
        batch: list[FetchedMessage] = []
        for item in plan:
            if item.uid in gone:
                continue
            if _too_large(item.size, max_size):
                batch.append(FetchedMessage(item.uid, None, item.flags, item.size))
                continue
            raw = bodies.pop(item.uid, None)
            if raw is None:
                return batch, self._unanswered(item.uid, "its body")
            if _too_large(len(raw), max_size):  # the server understated its size
                batch.append(FetchedMessage(item.uid, None, item.flags, len(raw)))
                continue
            batch.append(FetchedMessage(item.uid, raw, flags.get(item.uid, item.flags), len(raw)))
        return batch, None

    def _fetch(self, uids: list[int], items: str) -> list[Any]:
        conn = self._connection()
        conn.response("FETCH")  # drop FETCH responses left over from earlier commands
        typ, data = self._attempt("fetch", conn.uid, "FETCH", syntax.uid_set(uids), items)
        if typ != "OK":
            text = syntax.as_text(data[-1] if data else "")
            if syntax.response_code(text) == "EXPUNGEISSUED":  # RFC 5530: a retry will not see it
                raise TransientError(self._message("fetch", text))
            raise self._refusal("fetch", data)
        return data

    def _search_uids(self, uid_range: str) -> list[int]:
        """UIDs in `uid_range`, ascending; ESEARCH (RFC 4731) where offered, as it sends ranges."""
        conn = self._connection()
        if "ESEARCH" not in self.capabilities:
            data = self._ok("search", conn.uid, "SEARCH", "UID", uid_range)
            return sorted(set(self._read(replies.parse_search, data)))
        conn.response("ESEARCH")  # drop any left over from earlier commands
        data = self._ok("search", conn.uid, "SEARCH", "RETURN", "(ALL)", "UID", uid_range)
        _, esearch = conn.response("ESEARCH")
        found = self._read(replies.parse_esearch, esearch)
        return sorted(set(found).union(self._read(replies.parse_search, data)))

    def _gone(self, uids: list[int]) -> set[int]:
        """Which of `uids` the server no longer has (expunged since the search)."""
        if not uids:
            return set()
        present = self._search_uids(syntax.uid_set(uids))
        return set(uids).difference(present)

    def _unanswered(self, uid: int, what: str) -> TransientError:
        return TransientError(
            self._message(
                "fetch",
                f"the server did not send {what} for UID {uid} in {self.selected!r}, "
                "which it still lists; stopping before it",
            )
        )

    def _read(self, reader: Callable[[Sequence[object]], _T], data: Sequence[object]) -> _T:
        try:
            return reader(data)
        except replies.UnreadableReply as exc:
            raise PermanentError(self._message("read reply", f"unreadable reply: {exc}")) from None

    def move(self, uids: Sequence[int], target: str) -> None:
        """Move messages to `target` (created if missing): MOVE if offered, else COPY+EXPUNGE."""
        uid_set = syntax.uid_set(uids)
        self._require_writable()
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
        self._require_writable()
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
        return sorted(set(self._read(replies.parse_search, data)))

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

    # -- kept sessions ---------------------------------------------------------------------------

    def _answers(self) -> bool:
        """NOOP on a kept session: False if the server closed it meanwhile (or says BYE)."""
        try:
            typ, _ = self._connection().noop()
        except (imaplib.IMAP4.error, OSError):
            return False
        return typ == "OK"

    def _drop(self) -> None:
        """Close without a word (a connection found dead)."""
        conn, self._conn = self._conn, None
        self.selected = None
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.shutdown()

    # -- helpers ---------------------------------------------------------------------------------

    def _connection(self) -> imaplib.IMAP4:
        if self._conn is None:
            raise PermanentError("ImapSession used outside its `with` block")
        return self._conn

    def _require_selected(self) -> None:
        if self.selected is None:
            raise PermanentError("no folder selected: call select() first")

    def _require_writable(self) -> None:
        self._require_selected()
        if self.read_only:
            raise PermanentError(f"{self.selected!r} was opened read-only (EXAMINE)")

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


def kept_imap_connections(
    idle_seconds: float, max_messages: int, max_connections: int
) -> KeptConnections:
    """This process's kept IMAP sessions for these bounds (mail/kept_connections.py)."""
    return kept_for(
        "imap",
        (idle_seconds, max_messages, max_connections),
        goodbye=_logout_kept,
        drop=ImapSession._drop,
    )


def _logout_kept(session: ImapSession) -> None:
    conn = session._connection()
    conn.sock.settimeout(GOODBYE_TIMEOUT)
    session.close()


@contextlib.contextmanager
def kept_imap_session(
    endpoint: MailEndpoint, kept: KeptConnections | None, account: str
) -> Iterator[ImapSession]:
    """An ImapSession for `endpoint`: the one kept for (`account`, `endpoint`) if it still
    answers, else a new one; kept again after a block that raised nothing (see the module
    docstring). Without `kept` (or with reuse off) what `with ImapSession(endpoint)` does."""
    key = SessionKey.of(account, endpoint) if kept is not None and kept.enabled else None
    taken = kept.take(key, endpoint.deadline) if kept is not None and key is not None else None
    session: ImapSession | None = None
    carried = 0
    if taken is not None:
        session, carried = taken
        assert session is not None
        if not session._answers():
            # The new session gets what is left of this one's deadline, as in mail/smtp.py.
            left = session.deadline.remaining()
            session._drop()
            session, carried = None, 0
            if left <= 0:
                raise TransientError(f"IMAP session with {endpoint.address} passed its deadline")
            endpoint = dataclasses.replace(endpoint, deadline=left)
    if session is None:
        session = ImapSession(endpoint).__enter__()
    finished = False
    try:
        yield session
        finished = True
    finally:
        kept_again = False
        if finished and kept is not None and key is not None and session.selected is None:
            with contextlib.suppress(Exception):
                kept_again = kept.give_back(key, session, carried + 1)
        if not kept_again:
            session.close()


def plan_batches(
    listed: Sequence[ListedMessage],
    batch_size: int,
    batch_bytes: int | None,
    max_size: int | None,
) -> Iterator[list[ListedMessage]]:
    """Split messages, in order, into batches of at most `batch_size` messages and
    `batch_bytes` bytes; a message bigger than `batch_bytes` goes alone, one above `max_size`
    (not fetched) counts no bytes."""
    batch: list[ListedMessage] = []
    total = 0
    for item in listed:
        size = 0 if _too_large(item.size, max_size) else item.size
        full = len(batch) >= batch_size or (batch_bytes is not None and total + size > batch_bytes)
        if batch and full:
            yield batch
            batch, total = [], 0
        batch.append(item)
        total += size
    if batch:
        yield batch


def _too_large(size: int, max_size: int | None) -> bool:
    return max_size is not None and size > max_size


def _require_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidTaskArguments(f"{name} must be an integer >= {minimum}, got {value!r}")
