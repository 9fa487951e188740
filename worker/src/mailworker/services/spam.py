"""Classifying synced messages with the transparent rule set, storing the verdict, moving spam.

Scores are stored first (deterministic, so a rerun stores the same), reading one raw message at
a time so memory does not grow with the number of ids. Then the spam is moved to Junk per
(account, folder) under the same rules as a delete (message_actions.py): only rows still
`present` and claimed by this task are moved, a folder renumbered since the sync is left alone,
and every spam message not moved is reported with the reason.
"""

from __future__ import annotations

import logging
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import LargeBinary, func, select, update

from mailworker.db.engine import session_scope
from mailworker.db.models import Message
from mailworker.errors import PermanentError
from mailworker.mail.imap import ImapSession
from mailworker.services import message_actions as actions
from mailworker.services.access import AccountAccess
from mailworker.services.parsing import MAX_PARSED_BYTES
from mailworker.settings import Settings
from mailworker.spam.rules import score_message
from mailworker.tenancy import owned_messages

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Owned:
    """What classify needs of a row, without its raw message."""

    message_id: uuid.UUID
    account_id: uuid.UUID
    recipient: str
    folder: str
    state: str
    moved_before: bool  # an earlier attempt of this task moved it to Junk


def classify(
    settings: Settings,
    tenant_id: uuid.UUID,
    user_id: uuid.UUID,
    message_ids: Sequence[uuid.UUID],
    *,
    token: str,
) -> dict:
    """Score the messages, store the verdicts, move spam; `token` identifies this task's claims."""
    owned: list[Owned] = []
    accesses: dict[uuid.UUID, AccountAccess] = {}
    with session_scope(settings) as session:
        for message, account in owned_messages(session, tenant_id, user_id, message_ids):
            owned.append(
                Owned(
                    message.id,
                    account.id,
                    account.email,
                    message.folder,
                    message.state,
                    actions.done_before(message, "junk", token),
                )
            )
            if account.id not in accesses:
                accesses[account.id] = AccountAccess.of(account, settings)
    scores = _score(settings, owned)
    spam = [item for item in owned if scores.get(item.message_id, (0.0, False))[1]]
    moved = {item.message_id for item in spam if item.moved_before}
    not_moved: dict[uuid.UUID, str] = {}
    groups: dict[tuple[uuid.UUID, str], list[uuid.UUID]] = defaultdict(list)
    for item in spam:
        if item.moved_before or item.folder == settings.junk_folder:
            continue
        if item.state != "present":
            not_moved[item.message_id] = actions.NOT_PRESENT
        else:
            groups[(item.account_id, item.folder)].append(item.message_id)
    ham = [message_id for message_id, (_, is_spam) in scores.items() if not is_spam]
    # A resubmitted classification whose verdict changed (new rules) gives its claim up.
    actions.release(settings, ham, token, "no longer classified as spam", failed=False)
    for (account_id, folder), ids in groups.items():
        moved |= _move_group(
            settings, accesses[account_id], folder, ids, token=token, not_moved=not_moved
        )
    return {
        "classified": len(scores),
        # Rows sync recorded as too large to fetch have no text to score.
        "not_classified": {
            str(item.message_id): "skipped" for item in owned if item.message_id not in scores
        },
        "spam": len(spam),
        "moved_to_junk": len(moved),
        "not_moved": {str(message_id): reason for message_id, reason in not_moved.items()},
        "scores": {str(message_id): score for message_id, (score, _) in scores.items()},
    }


def _score(settings: Settings, owned: list[Owned]) -> dict[uuid.UUID, tuple[float, bool]]:
    """Score and store each message, holding one raw message in memory at a time."""
    scores: dict[uuid.UUID, tuple[float, bool]] = {}
    with session_scope(settings) as session:
        for item in owned:
            # The rules read headers and text: the first MAX_PARSED_BYTES are what sync parses too
            # (the email package needs about 9x what it parses).
            start = func.substring(Message.raw, 1, MAX_PARSED_BYTES, type_=LargeBinary)
            raw = session.scalar(select(start).where(Message.id == item.message_id))
            if raw is None:  # skipped by sync as too large: nothing to score
                continue
            verdict = score_message(raw, recipient=item.recipient)
            del raw
            session.execute(
                update(Message)
                .where(Message.id == item.message_id)
                .values(
                    spam_score=verdict.score,
                    is_spam=verdict.is_spam,
                    spam_reasons=list(verdict.reasons),
                    classified_at=func.now(),
                )
            )
            scores[item.message_id] = (verdict.score, verdict.is_spam)
    return scores


def _move_group(
    settings: Settings,
    access: AccountAccess,
    folder: str,
    ids: list[uuid.UUID],
    *,
    token: str,
    not_moved: dict[uuid.UUID, str],
) -> set[uuid.UUID]:
    """Claim, move and finalize one folder's spam; what is not moved goes into `not_moved`.

    A transient error propagates (the task retries; the claims stay for the retry or the
    sweep); a renumbered folder or a refusal leaves this folder's spam in place.
    """
    claimed = actions.claim(settings, ids, "junk", token)
    claimed_ids = {item.id for item in claimed}
    not_moved.update(actions.why_not_claimed(settings, set(ids) - claimed_ids))
    if not claimed:
        return set()
    try:
        with ImapSession(access.imap) as imap:
            server = imap.select(folder)
            if {item.uidvalidity for item in claimed} != {server.uidvalidity}:
                logger.warning(
                    "account %s folder %r was renumbered; %d spam message(s) left in place",
                    access.account_id,
                    folder,
                    len(claimed),
                )
                actions.release(
                    settings, claimed_ids, token, "folder renumbered since sync", failed=False
                )
                not_moved.update(dict.fromkeys(claimed_ids, actions.RENUMBERED))
                return set()
            imap.move([item.uid for item in claimed], settings.junk_folder)
    except PermanentError as error:
        logger.error("account %s folder %r: spam not moved: %s", access.account_id, folder, error)
        actions.release(settings, claimed_ids, token, str(error), failed=True)
        not_moved.update(dict.fromkeys(claimed_ids, actions.FAILED))
        return set()
    finalized = actions.finalize(settings, claimed_ids, "junk", token, settings.junk_folder)
    not_moved.update(actions.why_not_claimed(settings, claimed_ids - finalized))
    return finalized
