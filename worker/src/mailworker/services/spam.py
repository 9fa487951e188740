"""Classifying synced messages with the transparent rule set, storing the verdict, moving spam.

Scores are stored first (deterministic, so a rerun stores the same), reading one raw message at
a time so memory does not grow with the number of ids. Then the spam is moved to Junk per
(account, folder) under the same rules as a delete (message_actions.py): only rows still
`present` and claimed by this task are moved, a folder renumbered since the sync is left alone,
and every spam message not moved is reported with the reason; spam that another classification
of the same message moved (or is moving) is counted as `already_in_junk`, not as a failure.

New mail is classified without being asked: the sync queues classify_spam for what each batch
stored, after its commit, and `queue_unclassified` (beat, every MAILWORKER_CLASSIFY_SWEEP_INTERVAL)
queues what is still unscored MAILWORKER_CLASSIFY_GRACE later, when that publish was lost.
"""

from __future__ import annotations

import logging
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Final

from sqlalchemy import LargeBinary, and_, func, or_, select, update

from mailworker.db.engine import session_scope
from mailworker.db.models import MailAccount, Message, Tenant, User
from mailworker.errors import PermanentError
from mailworker.mail.imap import ImapSession
from mailworker.services import message_actions as actions
from mailworker.services.access import AccountAccess
from mailworker.services.parsing import MAX_PARSED_BYTES
from mailworker.settings import Settings
from mailworker.spam.rules import score_message
from mailworker.tenancy import owned_messages

logger = logging.getLogger(__name__)

# Message ids per classify_spam task that the sync and the sweep queue: a task scores them in
# seconds, and a worker's other tasks wait no longer than that.
CLASSIFY_BATCH: Final = 100
# Rows the classify sweep queues per run; the next run takes the rest.
SWEEP_LIMIT: Final = 10_000
# Queues classify_spam(tenant_id, user_id, message_ids); raises when the broker refuses.
Publish = Callable[[uuid.UUID, uuid.UUID, list[uuid.UUID]], None]


def classified_automatically(settings: Settings, folder: str) -> bool:
    """Whether new mail in `folder` is classified without being asked: mail that arrives.

    Not Junk (already where spam goes: nothing to move), nor Sent (the user's own mail) nor
    Trash (thrown away), when they are synced too: moving those to Junk is never what a user
    wants. `classify_spam` still takes their ids when asked.
    """
    return folder not in {settings.junk_folder, settings.sent_folder, settings.trash_folder}


def batches(ids: Sequence[uuid.UUID]) -> list[list[uuid.UUID]]:
    return [
        list(ids[start : start + CLASSIFY_BATCH]) for start in range(0, len(ids), CLASSIFY_BATCH)
    ]


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
    already: set[uuid.UUID] = set()
    not_moved: dict[uuid.UUID, str] = {}
    groups: dict[tuple[uuid.UUID, str], list[uuid.UUID]] = defaultdict(list)
    for item in spam:
        if item.moved_before or item.folder == settings.junk_folder:
            continue
        if item.state == "junk":  # another classify of it (the sweep's, a resubmission) moved it
            already.add(item.message_id)
        elif item.state != "present":
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
    # A doubled classification (the sweep racing a slow one, a redelivery) is no failure: what
    # the other one moved, or is moving, to Junk is counted apart, not reported as not moved.
    already |= _junk_elsewhere(settings, {i for i, why in not_moved.items() if why in _RACED})
    for message_id in already:
        not_moved.pop(message_id, None)
    return {
        "classified": len(scores),
        # Rows sync recorded as too large to fetch have no text to score.
        "not_classified": {
            str(item.message_id): "skipped" for item in owned if item.message_id not in scores
        },
        "spam": len(spam),
        "moved_to_junk": len(moved),
        "already_in_junk": len(already),
        "not_moved": {str(message_id): reason for message_id, reason in not_moved.items()},
        "scores": {str(message_id): score for message_id, (score, _) in scores.items()},
    }


_RACED: Final = (actions.BUSY, actions.NOT_PRESENT)


def _junk_elsewhere(settings: Settings, ids: set[uuid.UUID]) -> set[uuid.UUID]:
    """Those of `ids` another task moved to Junk, or holds a claim to move there, read now."""
    if not ids:
        return set()
    with session_scope(settings) as session:
        found = session.scalars(
            select(Message.id)
            .where(Message.id.in_(list(ids)))
            .where(
                or_(
                    Message.state == "junk",
                    and_(Message.action == "junk", Message.action_state == "pending"),
                )
            )
        ).all()
    return set(found)


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


def queue_unclassified(settings: Settings, publish: Publish) -> dict[str, int]:
    """Queue classify_spam for present messages still unscored CLASSIFY_GRACE after they were
    stored (the sync's own publish was lost), and for spam scored that long ago yet neither
    moved nor claimed (its classification died between storing the verdict and claiming).

    Only rows of active accounts, users and tenants (classify_spam rejects the others, and the
    sweep would queue them forever), in the folders classified automatically. Each row queued is
    stamped first, so a backlog in the spam queue is queued again once per grace, not per sweep;
    what a failed publish leaves is unstamped again for the next sweep. A doubled
    classification is harmless: same verdicts, and each move to Junk is claimed once. Spam whose
    move failed (action_state `failed`) is an operator's to look at, not queued again.
    """
    before = func.now() - timedelta(seconds=settings.classify_grace)
    skipped = (settings.junk_folder, settings.sent_folder, settings.trash_folder)
    unscored = and_(Message.classified_at.is_(None), Message.synced_at < before)
    # `is_spam` as is, not IS TRUE: PostgreSQL then proves the partial index's predicate.
    unmoved = and_(
        Message.is_spam,
        Message.action_state.is_(None),
        Message.classified_at < before,
    )
    with session_scope(settings) as session:
        rows = session.execute(
            select(Message.id, Message.tenant_id, MailAccount.user_id, Message.classified_at)
            .join(MailAccount, MailAccount.id == Message.account_id)
            .join(User, User.id == MailAccount.user_id)
            .join(Tenant, Tenant.id == Message.tenant_id)
            .where(Message.state == "present", or_(unscored, unmoved))
            .where(or_(Message.classify_queued_at.is_(None), Message.classify_queued_at < before))
            .where(Message.folder.not_in(skipped))
            .where(MailAccount.active, User.active, Tenant.active)
            .order_by(Message.tenant_id, MailAccount.user_id, Message.synced_at)
            .limit(SWEEP_LIMIT)
            .with_for_update(of=Message, skip_locked=True)
        ).all()
        groups: dict[tuple[uuid.UUID, uuid.UUID], list[uuid.UUID]] = defaultdict(list)
        for message_id, tenant_id, user_id, _ in rows:
            groups[(tenant_id, user_id)].append(message_id)
        if rows:
            session.execute(
                update(Message)
                .where(Message.id.in_([row[0] for row in rows]))
                .values(classify_queued_at=func.now())
            )
    # Published after the commit, as the sync does.
    queued = 0
    pending = [(key, ids) for key, all_ids in groups.items() for ids in batches(all_ids)]
    for index, ((tenant_id, user_id), ids) in enumerate(pending):
        try:
            publish(tenant_id, user_id, ids)
        except Exception as error:  # the broker is down: the rest waits for the next sweep
            left = [message_id for _, rest in pending[index:] for message_id in rest]
            with session_scope(settings) as session:
                session.execute(
                    update(Message).where(Message.id.in_(left)).values(classify_queued_at=None)
                )
            logger.warning(
                "classify sweep: queueing failed (%s); %d message(s) left for the next sweep",
                error,
                len(left),
            )
            break
        queued += len(ids)
    summary = {
        "unscored": sum(1 for row in rows if row[3] is None),
        "spam_not_moved": sum(1 for row in rows if row[3] is not None),
        "queued": queued,
    }
    if rows:
        logger.warning(
            "classify sweep: %d message(s) still unscored and %d spam message(s) not moved "
            "%d s after the sync or the verdict; %d queued for classify_spam",
            summary["unscored"],
            summary["spam_not_moved"],
            settings.classify_grace,
            queued,
        )
    return summary
