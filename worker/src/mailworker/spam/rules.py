"""A transparent spam score: named rules with weights, summed and compared with a threshold.

A message is spam when the weights of the rules it fires add up to THRESHOLD (5.0) or more. The
verdict lists the names of the rules that fired, so a user or an operator can see why.

    rule                    weight  fires when
    spf_fail                  2.5   the topmost Authentication-Results says spf=fail
    spf_softfail              1.0   ... says spf=softfail
    dkim_fail                 2.0   ... says dkim=fail
    dmarc_fail                3.0   ... says dmarc=fail
    from_missing              3.0   there is no parsable From address
    return_path_mismatch      1.0   the Return-Path domain differs from the From domain
    reply_to_mismatch         1.5   a Reply-To domain differs from the From domain
    recipient_not_listed      1.5   the recipient is in neither To nor Cc (a Bcc blast), unless
                                    the message comes from a mailing list (List-Id)
    many_recipients           1.5   To and Cc hold more than 10 addresses
    subject_keywords          2.0   the subject contains a phrase from SUBJECT_PHRASES
    body_keywords             1.5   the body contains 2 or more phrases from BODY_PHRASES
    subject_all_caps          1.5   the subject has 8 or more letters, all of them capitals
    link_ip_literal           2.5   a link points at an IP address instead of a name
    link_text_mismatch        2.5   a link's visible text shows a domain other than its target's
    message_id_missing        0.5   there is no Message-ID header

Domains are compared by their last two labels (see facts.organizational_domain), so mail from
mx.example.com with a Return-Path at bounce.example.com counts as the same sender.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from mailworker.spam.facts import (
    MessageFacts,
    is_ip_literal,
    link_host,
    organizational_domain,
    shown_domain,
)

THRESHOLD = 5.0
MANY_RECIPIENTS = 10
MIN_CAPS_LETTERS = 8
MIN_BODY_PHRASES = 2

SUBJECT_PHRASES = (
    "viagra",
    "cialis",
    "lottery",
    "you have won",
    "you've won",
    "winner",
    "claim your prize",
    "free money",
    "act now",
    "limited time",
    "100% free",
    "risk-free",
    "no credit check",
    "work from home",
    "double your",
    "crypto investment",
    "casino",
    "inheritance",
    "account suspended",
    "verify your account",
)
BODY_PHRASES = (
    "verify your account",
    "confirm your password",
    "your account has been suspended",
    "wire transfer",
    "western union",
    "bank details",
    "beneficiary",
    "million dollars",
    "claim your prize",
    "you have won",
    "lottery",
    "inheritance",
    "act now",
    "limited time offer",
    "click here",
    "100% free",
    "risk-free",
    "no credit check",
    "guaranteed income",
    "crypto investment",
    "dear friend",
    "dear beneficiary",
)


@dataclass(frozen=True)
class SpamVerdict:
    score: float
    is_spam: bool
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class Rule:
    name: str
    weight: float
    fires: Callable[[MessageFacts], bool]


def score_message(raw: bytes, *, recipient: str) -> SpamVerdict:
    """Score `raw` as delivered to `recipient` (the mailbox owner's address)."""
    facts = MessageFacts.from_bytes(raw, recipient=recipient)
    fired = [rule for rule in RULES if rule.fires(facts)]
    score = round(float(sum(rule.weight for rule in fired)), 2)
    return SpamVerdict(
        score=score, is_spam=score >= THRESHOLD, reasons=tuple(rule.name for rule in fired)
    )


def _auth(method: str, result: str) -> Callable[[MessageFacts], bool]:
    return lambda facts: result in facts.auth_results.get(method, frozenset())


def _from_domain(facts: MessageFacts) -> str | None:
    return organizational_domain(facts.from_addresses[0]) if facts.from_addresses else None


def _return_path_mismatch(facts: MessageFacts) -> bool:
    sender = _from_domain(facts)
    # An empty Return-Path (<>) marks a bounce, which has no sender domain to compare.
    if sender is None or not facts.return_path:
        return False
    return organizational_domain(facts.return_path) != sender


def _reply_to_mismatch(facts: MessageFacts) -> bool:
    sender = _from_domain(facts)
    return sender is not None and any(
        organizational_domain(address) != sender for address in facts.reply_to
    )


def _recipient_not_listed(facts: MessageFacts) -> bool:
    if facts.is_list_mail or not facts.recipient:
        return False
    return facts.recipient not in facts.listed_recipients


def _phrases(phrases: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile(
        "|".join(rf"(?<!\w){re.escape(phrase)}(?!\w)" for phrase in phrases), re.IGNORECASE
    )


_SUBJECT_PATTERN = _phrases(SUBJECT_PHRASES)
_BODY_PATTERN = _phrases(BODY_PHRASES)


def _body_keywords(facts: MessageFacts) -> bool:
    found = {match.lower() for match in _BODY_PATTERN.findall(facts.text)}
    return len(found) >= MIN_BODY_PHRASES


def _subject_all_caps(facts: MessageFacts) -> bool:
    letters = [ch for ch in facts.subject if ch.isalpha()]
    return len(letters) >= MIN_CAPS_LETTERS and all(ch.isupper() for ch in letters)


def _link_ip_literal(facts: MessageFacts) -> bool:
    return any(is_ip_literal(host) for link in facts.links if (host := link_host(link.href)))


def _link_text_mismatch(facts: MessageFacts) -> bool:
    for link in facts.links:
        claimed = shown_domain(link.text) if link.text else None
        target = link_host(link.href)
        if claimed and target and organizational_domain(claimed) != organizational_domain(target):
            return True
    return False


RULES: tuple[Rule, ...] = (
    Rule("spf_fail", 2.5, _auth("spf", "fail")),
    Rule("spf_softfail", 1.0, _auth("spf", "softfail")),
    Rule("dkim_fail", 2.0, _auth("dkim", "fail")),
    Rule("dmarc_fail", 3.0, _auth("dmarc", "fail")),
    Rule("from_missing", 3.0, lambda facts: not facts.from_addresses),
    Rule("return_path_mismatch", 1.0, _return_path_mismatch),
    Rule("reply_to_mismatch", 1.5, _reply_to_mismatch),
    Rule("recipient_not_listed", 1.5, _recipient_not_listed),
    Rule("many_recipients", 1.5, lambda facts: len(facts.listed_recipients) > MANY_RECIPIENTS),
    Rule("subject_keywords", 2.0, lambda facts: bool(_SUBJECT_PATTERN.search(facts.subject))),
    Rule("body_keywords", 1.5, _body_keywords),
    Rule("subject_all_caps", 1.5, _subject_all_caps),
    Rule("link_ip_literal", 2.5, _link_ip_literal),
    Rule("link_text_mismatch", 2.5, _link_text_mismatch),
    Rule("message_id_missing", 0.5, lambda facts: not facts.has_message_id),
)
