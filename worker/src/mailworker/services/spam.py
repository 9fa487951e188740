"""Classifying synced messages with the transparent rule set, storing the verdict, moving spam.

Scores are stored first (deterministic, so a rerun stores the same), then spam still `present`
is moved to Junk per (account, folder) and its rows marked `junk`. A rerun skips what is marked.
"""

from __future__ import annotations

import logging
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import func, update

from mailworker.db.engine import session_scope
from mailworker.db.models import Message
from mailworker.mail.imap import ImapSession
from mailworker.services.access import AccountAccess
from mailworker.settings import Settings
from mailworker.spam.rules import score_message
from mailworker.tenancy import owned_messages

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scored:
    message_id: uuid.UUID
    account_id: uuid.UUID
    folder: str
    uidvalidity: int
    uid: int
    score: float
    is_spam: bool
    movable: bool  # spam still in its folder


def classify(
    settings: Settings,
    tenant_id: uuid.UUID,
    user_id: uuid.UUID,
    message_ids: Sequence[uuid.UUID],
) -> dict:
    scored: list[Scored] = []
    accesses: dict[uuid.UUID, AccountAccess] = {}
    with session_scope(settings) as session:
        for message, account in owned_messages(session, tenant_id, user_id, message_ids):
            if message.raw is None:  # skipped by sync as too large: nothing to score
                continue
            verdict = score_message(message.raw, recipient=account.email)
            message.spam_score = verdict.score
            message.is_spam = verdict.is_spam
            message.spam_reasons = list(verdict.reasons)
            message.classified_at = func.now()
            scored.append(
                Scored(
                    message.id,
                    account.id,
                    message.folder,
                    message.uidvalidity,
                    message.uid,
                    verdict.score,
                    verdict.is_spam,
                    verdict.is_spam
                    and message.state == "present"
                    and message.folder != settings.junk_folder,
                )
            )
            if verdict.is_spam and account.id not in accesses:
                accesses[account.id] = AccountAccess.of(account, settings)
    moved = _move_spam(settings, accesses, [item for item in scored if item.movable])
    return {
        "classified": len(scored),
        "spam": sum(1 for item in scored if item.is_spam),
        "moved_to_junk": moved,
        "scores": {str(item.message_id): item.score for item in scored},
    }


def _move_spam(
    settings: Settings, accesses: dict[uuid.UUID, AccountAccess], spam: list[Scored]
) -> int:
    groups: dict[tuple[uuid.UUID, str, int], list[Scored]] = defaultdict(list)
    for item in spam:
        groups[(item.account_id, item.folder, item.uidvalidity)].append(item)
    moved = 0
    for (account_id, folder, uidvalidity), items in groups.items():
        access = accesses[account_id]
        with ImapSession(access.imap) as imap:
            server = imap.select(folder)
            if server.uidvalidity != uidvalidity:
                logger.warning(
                    "account %s folder %r was renumbered; %d spam message(s) left in place",
                    account_id,
                    folder,
                    len(items),
                )
                continue
            imap.move([item.uid for item in items], settings.junk_folder)
        with session_scope(settings) as session:
            moved += session.execute(
                update(Message)
                .where(Message.id.in_([item.message_id for item in items]))
                .where(Message.account_id == account_id)
                .where(Message.state == "present")
                .values(
                    state="junk",
                    moved_to=settings.junk_folder,
                    state_changed_at=func.now(),
                )
            ).rowcount
    return moved
