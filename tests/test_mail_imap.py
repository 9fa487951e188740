"""ImapSession against a real Dovecot: UIDs, batches, flags, folders and every failure class."""

from __future__ import annotations

import dataclasses
import socket
import ssl
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mailworker.errors import (
    AuthenticationFailed,
    InvalidTaskArguments,
    PermanentError,
    TransientError,
)
from mailworker.mail.endpoints import MailEndpoint, Security
from mailworker.mail.imap import FetchedMessage, ImapSession

from tests.fixtures.imap_wire import BodyDroppingProxy
from tests.fixtures.mailservers import (
    HOST,
    LEGACY_USER,
    DovecotServer,
    MailUser,
    free_port,
    make_certificates,
)


def message(number: int, *, subject: str | None = None) -> bytes:
    subject = subject or f"Message {number}"
    return (
        f"From: Sender <sender@example.org>\r\n"
        f"To: someone@tenant-a.test\r\n"
        f"Subject: {subject}\r\n"
        f"Message-ID: <msg-{number}@example.org>\r\n"
        f"Date: Mon, 6 May 2024 10:00:00 +0000\r\n"
        f"MIME-Version: 1.0\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\n"
        f"\r\n"
        f"Body of message {number}.\r\n"
    ).encode()


@pytest.fixture
def user(dovecot: DovecotServer) -> MailUser:
    return dovecot.new_user()


def fill(dovecot: DovecotServer, user: MailUser, count: int) -> None:
    for number in range(1, count + 1):
        assert dovecot.deliver(user.address, message(number)) == 0


def uids(batches: Iterator[list[FetchedMessage]]) -> list[list[int]]:
    return [[fetched.uid for fetched in batch] for batch in batches]


def test_select_reports_uidvalidity_uidnext_and_count(dovecot, user):
    fill(dovecot, user, 2)
    with ImapSession(dovecot.endpoint(user.address)) as imap:
        state = imap.select("INBOX")
        again = imap.select("INBOX")
    assert state.exists == 2
    assert state.uidnext == 3
    assert state.uidvalidity > 0
    assert again == state


def test_examine_reads_and_leaves_the_folder_as_it_was(dovecot, user):
    # What the sync does: EXAMINE, then fetch. The new messages stay \Recent for the next
    # session (the user's own client); a SELECT would have taken the flag. And nothing can be
    # changed through a folder opened read-only.
    fill(dovecot, user, 2)
    endpoint = dovecot.endpoint(user.address)
    with ImapSession(endpoint) as reader:
        examined = reader.select("INBOX", readonly=True)
        (batch,) = reader.fetch_batches(0, 10)
        with pytest.raises(PermanentError, match="read-only"):
            reader.move([1], "Trash")
        with pytest.raises(PermanentError, match="read-only"):
            reader.expunge([1])
    assert [(m.uid, m.flags) for m in batch] == [(1, ()), (2, ())]
    with ImapSession(endpoint) as client:
        assert client.select("INBOX") == examined
        _, recent = client._connection().response("RECENT")
        (again,) = client.fetch_batches(0, 10)
    assert recent == [b"2"]
    assert [(m.uid, m.raw) for m in again] == [(m.uid, m.raw) for m in batch]


def test_select_of_missing_folder_is_permanent(dovecot, user):
    with ImapSession(dovecot.endpoint(user.address)) as imap, pytest.raises(PermanentError) as e:
        imap.select("Does Not Exist")
    assert not isinstance(e.value, TransientError)
    assert "Does Not Exist" in str(e.value)


def test_fetch_batches_after_a_uid_in_ascending_order(dovecot, user):
    fill(dovecot, user, 5)
    with ImapSession(dovecot.endpoint(user.address)) as imap:
        imap.select("INBOX")
        batches = list(imap.fetch_batches(after_uid=2, batch_size=2))
        everything = uids(imap.fetch_batches(after_uid=0, batch_size=10))
    assert [[m.uid for m in batch] for batch in batches] == [[3, 4], [5]]
    assert b"Message-ID: <msg-3@example.org>" in batches[0][0].raw
    assert batches[1][0].raw.rstrip().endswith(b"Body of message 5.")
    assert everything == [[1, 2, 3, 4, 5]]


def test_fetch_after_the_highest_uid_yields_nothing(dovecot, user):
    # "UID n:*" matches the highest UID even when it is below n; that message must not come back.
    fill(dovecot, user, 3)
    with ImapSession(dovecot.endpoint(user.address)) as imap:
        state = imap.select("INBOX")
        assert uids(imap.fetch_batches(after_uid=state.uidnext - 1, batch_size=10)) == []
        assert uids(imap.fetch_batches(after_uid=2, batch_size=10)) == [[3]]


def test_fetch_uses_peek_and_leaves_messages_unseen(dovecot, user):
    fill(dovecot, user, 2)
    with ImapSession(dovecot.endpoint(user.address)) as imap:
        imap.select("INBOX")
        first = [m for batch in imap.fetch_batches(0, 10) for m in batch]
        second = [m for batch in imap.fetch_batches(0, 10) for m in batch]
    assert all("\\Seen" not in m.flags for m in first + second)
    stored = dovecot.mailbox(user.address)
    assert len(stored) == 2
    assert not any(m.seen for m in stored)


def test_fetch_reports_flags_set_on_the_server(dovecot, user):
    with ImapSession(dovecot.endpoint(user.address)) as imap:
        imap.append("INBOX", message(1), ["\\Seen", "\\Flagged"])
        imap.select("INBOX")
        (fetched,) = next(imap.fetch_batches(0, 10))
    assert set(fetched.flags) == {"\\Seen", "\\Flagged"}


@pytest.mark.parametrize("target", ["Junk", "Papierkorb Entwürfe"])
def test_move_creates_the_target_folder(dovecot, user, target):
    fill(dovecot, user, 3)
    with ImapSession(dovecot.endpoint(user.address)) as imap:
        imap.select("INBOX")
        assert "MOVE" in imap.capabilities
        imap.move([1, 3], target)
        left = uids(imap.fetch_batches(0, 10))
        moved_state = imap.select(target)
        moved = [m.raw for batch in imap.fetch_batches(0, 10) for m in batch]
    assert left == [[2]]
    assert moved_state.exists == 2
    assert [b"<msg-1@example.org>" in moved[0], b"<msg-3@example.org>" in moved[1]] == [True, True]
    assert [m.message_id for m in dovecot.mailbox(user.address, target)] == [
        "<msg-1@example.org>",
        "<msg-3@example.org>",
    ]


def test_move_into_an_existing_folder(dovecot, user):
    fill(dovecot, user, 2)
    with ImapSession(dovecot.endpoint(user.address)) as imap:
        imap.select("INBOX")
        imap.move([1], "Trash")
        imap.move([2], "Trash")
        assert imap.select("Trash").exists == 2


def test_move_without_the_move_extension_copies_and_expunges(dovecot):
    # This user's server announces plain IMAP4rev1 after login: no MOVE, no UIDPLUS.
    fill(dovecot, MailUser(LEGACY_USER, dovecot.users[LEGACY_USER]), 2)
    with ImapSession(dovecot.endpoint(LEGACY_USER)) as imap:
        assert not {"MOVE", "UIDPLUS"} & imap.capabilities
        state = imap.select("INBOX")
        last = state.uidnext - 1
        imap.move([last], "Trash")
        remaining = [m.uid for batch in imap.fetch_batches(0, 100) for m in batch]
    assert last not in remaining
    assert len(remaining) == state.exists - 1
    assert "<msg-2@example.org>" in [m.message_id for m in dovecot.mailbox(LEGACY_USER, "Trash")]


def test_expunge_removes_only_the_given_uids(dovecot, user):
    fill(dovecot, user, 3)
    with ImapSession(dovecot.endpoint(user.address)) as imap:
        imap.select("INBOX")
        imap.expunge([2])
        imap.expunge([])
        assert uids(imap.fetch_batches(0, 10)) == [[1, 3]]
    assert [m.message_id for m in dovecot.mailbox(user.address)] == [
        "<msg-1@example.org>",
        "<msg-3@example.org>",
    ]


def test_append_creates_the_folder_and_sets_flags(dovecot, user):
    with ImapSession(dovecot.endpoint(user.address)) as imap:
        imap.append("Sent", message(7), ["\\Seen"])
        state = imap.select("Sent")
    assert state.exists == 1
    (stored,) = dovecot.mailbox(user.address, "Sent")
    assert stored.seen
    assert stored.message_id == "<msg-7@example.org>"


def test_search_header_finds_a_message_id(dovecot, user):
    fill(dovecot, user, 3)
    with ImapSession(dovecot.endpoint(user.address)) as imap:
        imap.select("INBOX")
        assert imap.search_header("Message-ID", "<msg-2@example.org>") == [2]
        assert imap.search_header("Message-ID", "<nothing@example.org>") == []


def test_search_header_with_non_ascii_text(dovecot, user):
    dovecot.deliver(user.address, message(1, subject="=?utf-8?q?Gr=C3=BC=C3=9Fe_aus_K=C3=B6ln?="))
    dovecot.deliver(user.address, message(2, subject="Hello"))
    with ImapSession(dovecot.endpoint(user.address)) as imap:
        imap.select("INBOX")
        assert imap.search_header("Subject", "Grüße") == [1]


def test_bad_password_is_authentication_failed_without_the_password(dovecot, user):
    secret = "Wr0ng-Secret-Passw0rd"
    endpoint = dovecot.endpoint(user.address, password=secret)
    with pytest.raises(AuthenticationFailed) as caught:
        ImapSession(endpoint).__enter__()
    rendered = "".join(traceback.format_exception(caught.value))
    assert user.address in str(caught.value)
    assert secret not in rendered
    assert secret not in repr(endpoint)


def test_stopped_server_is_transient_and_recovers(dovecot, user):
    fill(dovecot, user, 1)
    endpoint = dovecot.endpoint(user.address)
    session = ImapSession(endpoint).__enter__()
    try:
        dovecot.stop()
        with pytest.raises(TransientError):
            session.select("INBOX")  # the open session was closed under it
        with pytest.raises(TransientError, match="refused the connection"):
            ImapSession(endpoint).__enter__()
    finally:
        dovecot.start()
        session.__exit__(None, None, None)
    with ImapSession(endpoint) as imap:
        assert imap.select("INBOX").exists == 1


def test_silent_server_times_out_as_transient():
    with socket.socket() as listener:
        listener.bind((HOST, 0))
        listener.listen(1)  # accepts connections (kernel backlog) but never greets
        port = listener.getsockname()[1]
        endpoint = _endpoint(port, "plain", timeout=0.3)
        with pytest.raises(TransientError, match="did not answer"):
            ImapSession(endpoint).__enter__()


def test_nothing_listening_is_transient():
    with pytest.raises(TransientError, match="refused"):
        ImapSession(_endpoint(free_port(), "plain")).__enter__()


@pytest.mark.parametrize("security", ["ssl", "starttls"])
def test_tls_is_verified_with_the_ca_file(dovecot, user, security):
    with ImapSession(dovecot.endpoint(user.address, security)) as imap:
        assert imap.select("INBOX").exists == 0


@pytest.mark.parametrize("security", ["ssl", "starttls"])
def test_tls_without_the_ca_fails_permanently(dovecot, user, security):
    endpoint = dovecot.endpoint(user.address, security, ca_file=None)
    with pytest.raises(PermanentError, match="certificate verification failed") as caught:
        ImapSession(endpoint).__enter__()
    assert not isinstance(caught.value, TransientError)


def test_tls_verification_can_be_switched_off(dovecot, user):
    endpoint = dovecot.endpoint(user.address, "ssl", ca_file=None, verify_tls=False)
    with ImapSession(endpoint) as imap:
        assert imap.select("INBOX").exists == 0


def test_one_tls_context_per_ca_bundle_until_the_bundle_changes(dovecot, user, tmp_path):
    """The context is built once and shared; a CA bundle rewritten in place (a renewed CA) is
    loaded by the next session, and a verified context stays verified."""
    other = tmp_path / "other"
    other.mkdir()
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(make_certificates(other).ca_file.read_bytes())  # another CA
    endpoint = dovecot.endpoint(user.address, "ssl", ca_file=str(bundle))
    context = endpoint.tls_context()
    assert endpoint.tls_context() is context
    assert (context.verify_mode, context.check_hostname) == (ssl.CERT_REQUIRED, True)
    unverified = dataclasses.replace(endpoint, verify_tls=False).tls_context()
    assert (unverified.verify_mode, unverified.check_hostname) == (ssl.CERT_NONE, False)
    assert endpoint.tls_context() is context
    with pytest.raises(PermanentError, match="certificate verification failed"):
        ImapSession(endpoint).__enter__()

    bundle.write_bytes(Path(dovecot.ca_file).read_bytes())  # the server's CA, same path

    assert endpoint.tls_context() is not context
    with ImapSession(endpoint) as imap:
        assert imap.select("INBOX").exists == 0


def test_plain_login_works_where_the_server_allows_it(dovecot, user):
    with ImapSession(dovecot.endpoint(user.address, "plain")) as imap:
        assert imap.select("INBOX").exists == 0


def test_bad_arguments_are_rejected_before_any_command(dovecot, user):
    with ImapSession(dovecot.endpoint(user.address)) as imap:
        with pytest.raises(PermanentError, match="no folder selected"):
            imap.fetch_batches(0, 10)
        imap.select("INBOX")
        with pytest.raises(InvalidTaskArguments, match="after_uid"):
            imap.fetch_batches(-1, 10)
        with pytest.raises(InvalidTaskArguments, match="batch_size"):
            imap.fetch_batches(0, 0)
        with pytest.raises(InvalidTaskArguments, match="uids"):
            imap.move(["7"], "Trash")  # type: ignore[list-item]
        with pytest.raises(InvalidTaskArguments, match="flags"):
            imap.append("INBOX", message(1), ["\\Recent"])
        with pytest.raises(InvalidTaskArguments, match="single line"):
            imap.search_header("Subject", "a\r\nb")


def test_endpoint_rejects_bad_connection_data():
    with pytest.raises(PermanentError, match="security"):
        MailEndpoint(HOST, 993, "tls", "a@b.test", "pw")  # type: ignore[arg-type]
    with pytest.raises(PermanentError, match="port"):
        MailEndpoint(HOST, 0, "ssl", "a@b.test", "pw")
    assert "pw-secret" not in repr(MailEndpoint(HOST, 993, "ssl", "a@b.test", "pw-secret"))


def _endpoint(port: int, security: Security, **overrides: Any) -> MailEndpoint:
    return MailEndpoint(HOST, port, security, "nobody@tenant-a.test", "pw-123456", **overrides)


# --- the reader against Dovecot's real replies ------------------------------------------------


def test_keywords_spelled_like_fetch_items_are_flags(dovecot, user):
    # The old reader took the first "UID n" anywhere: here the keywords "UID" and "7".
    with ImapSession(dovecot.endpoint(user.address)) as imap:
        imap.append("INBOX", message(1), ["\\Seen"])
        imap.append("INBOX", message(2), ["UID", "7", "$Label1"])
        imap.select("INBOX")
        assert "ESEARCH" in imap.capabilities  # so the search below reads ESEARCH replies
        (batch,) = imap.fetch_batches(0, 10)
    assert [(m.uid, set(m.flags)) for m in batch] == [(1, {"\\Seen"}), (2, {"UID", "7", "$Label1"})]
    assert b"<msg-2@example.org>" in (batch[1].raw or b"")


def test_plain_search_without_esearch(dovecot):
    user = MailUser(LEGACY_USER, dovecot.users[LEGACY_USER])
    fill(dovecot, user, 2)
    with ImapSession(dovecot.endpoint(LEGACY_USER)) as imap:
        assert "ESEARCH" not in imap.capabilities
        state = imap.select("INBOX")
        found = [m.uid for batch in imap.fetch_batches(state.uidnext - 3, 10) for m in batch]
    assert found == [state.uidnext - 2, state.uidnext - 1]


def test_flag_changes_and_expunges_by_another_session_during_the_fetch(dovecot, user):
    # Dovecot interleaves `* n FETCH (FLAGS ...)` and `* n EXPUNGE` into the UID FETCH replies.
    fill(dovecot, user, 4)
    endpoint = dovecot.endpoint(user.address)
    with ImapSession(endpoint) as reader, ImapSession(endpoint) as other:
        reader.select("INBOX")
        batches = reader.fetch_batches(0, 1)
        first = next(batches)
        other.select("INBOX")
        other.expunge([3])
        other.append("INBOX", message(5), ["\\Flagged"])
        rest = list(batches)
    assert [m.uid for m in first] == [1]
    # UID 3 was expunged after the search: left out, no error; UID 5 came after the search.
    assert [[m.uid for m in batch] for batch in rest] == [[2], [4]]


def test_sizes_first_then_batches_bounded_in_bytes_and_large_ones_not_fetched(dovecot, user):
    sizes = [3_000, 40_000, 40_000, 10_000, 90_000, 2_000]
    for number, size in enumerate(sizes, start=1):
        padding = b"x" * 76 + b"\r\n"
        dovecot.deliver(user.address, message(number) + padding * (size // 78))
    with ImapSession(dovecot.endpoint(user.address)) as imap:
        imap.select("INBOX")
        batches = list(imap.fetch_batches(0, 100, batch_bytes=60_000, max_size=80_000))
    on_server = dovecot_sizes(dovecot, user)
    assert [[m.uid for m in batch] for batch in batches] == [[1, 2], [3, 4, 5, 6]]
    large = batches[1][2]
    assert (large.uid, large.raw, large.skipped) == (5, None, True)
    assert large.size == on_server[5] > 80_000
    fetched = [m for batch in batches for m in batch if not m.skipped]
    assert all(m.size == len(m.raw or b"") == on_server[m.uid] for m in fetched)
    assert all(sum(m.size for m in b if not m.skipped) <= 60_000 for b in batches)


def test_a_message_bigger_than_the_batch_comes_alone(dovecot, user):
    for number in (1, 2, 3):
        body = message(number) + (b"y" * 998 + b"\r\n") * (30 if number == 2 else 1)
        dovecot.deliver(user.address, body)
    with ImapSession(dovecot.endpoint(user.address)) as imap:
        imap.select("INBOX")
        batches = uids(imap.fetch_batches(0, 100, batch_bytes=5_000))
    assert batches == [[1], [2], [3]]


def test_a_message_returned_without_its_body_stops_before_it(dovecot, user):
    fill(dovecot, user, 5)
    proxy = BodyDroppingProxy(dovecot.port, drop_uid=3)
    endpoint = dovecot.endpoint(user.address, "plain", port=proxy.port)
    try:
        with ImapSession(endpoint) as imap:
            imap.select("INBOX")
            batches = imap.fetch_batches(0, 10)
            got = [[m.uid for m in next(batches)]]
            with pytest.raises(TransientError, match="UID 3") as e:
                next(batches)
    finally:
        proxy.close()
    assert proxy.dropped == 1
    assert got == [[1, 2]]  # what came before it, and nothing after it
    assert "still lists" in str(e.value)


def dovecot_sizes(dovecot: DovecotServer, user: MailUser) -> dict[int | None, int]:
    """UID -> size of the messages as IMAP sends them (the maildir keeps LF line ends)."""
    return {
        m.uid: len(m.raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
        for m in dovecot.mailbox(user.address)
    }
