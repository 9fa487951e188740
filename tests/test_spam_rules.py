"""The spam rule table on real-looking messages, and each rule on its own."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
from mailworker.spam import rules
from mailworker.spam.rules import RULES, THRESHOLD, score_message

DATA = Path(__file__).parent / "data" / "mail"
ALICE = "alice@tenant-a.test"


@pytest.mark.parametrize(
    ("name", "is_spam", "reasons"),
    [
        ("ham_colleague.eml", False, ()),
        ("ham_newsletter.eml", False, ()),
        ("ham_transactional_esp.eml", False, ("return_path_mismatch",)),
        (
            "spam_phishing.eml",
            True,
            (
                "spf_fail",
                "dmarc_fail",
                "return_path_mismatch",
                "reply_to_mismatch",
                "subject_keywords",
                "body_keywords",
                "subject_all_caps",
                "link_ip_literal",
                "link_text_mismatch",
                "message_id_missing",
            ),
        ),
        (
            "spam_lottery_bcc.eml",
            True,
            (
                "spf_softfail",
                "return_path_mismatch",
                "reply_to_mismatch",
                "recipient_not_listed",
                "subject_keywords",
                "body_keywords",
            ),
        ),
        (
            "spam_ip_links.eml",
            True,
            ("dkim_fail", "dmarc_fail", "many_recipients", "link_ip_literal"),
        ),
    ],
)
def test_real_looking_messages(name, is_spam, reasons):
    verdict = score_message((DATA / name).read_bytes(), recipient=ALICE)
    weights = {rule.name: rule.weight for rule in RULES}
    assert verdict.reasons == reasons
    assert verdict.score == pytest.approx(sum(weights[reason] for reason in reasons))
    assert verdict.is_spam is is_spam
    assert (verdict.score >= THRESHOLD) is is_spam


BASE_HEADERS: dict[str, str | None] = {
    "Return-Path": "<carol@tenant-a.test>",
    "Authentication-Results": "mx.tenant-a.test; spf=pass; dkim=pass; dmarc=pass",
    "From": "Carol <carol@tenant-a.test>",
    "To": "Alice <alice@tenant-a.test>",
    "Subject": "Lunch on Thursday?",
    "Message-ID": "<lunch-1@tenant-a.test>",
    "MIME-Version": "1.0",
    "Content-Type": "text/plain; charset=utf-8",
}
BASE_BODY = "Shall we try the new place round the corner? https://maps.tenant-a.test/x\n"


def compose(headers: Mapping[str, str | None], body: str = BASE_BODY) -> bytes:
    lines = [f"{name}: {value}" for name, value in headers.items() if value is not None]
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


def with_headers(**changes: str | None) -> Callable[[], bytes]:
    def build() -> bytes:
        headers = dict(BASE_HEADERS)
        headers.update({name.replace("_", "-"): value for name, value in changes.items()})
        return compose(headers)

    return build


def with_body(body: str, content_type: str = "text/plain; charset=utf-8") -> Callable[[], bytes]:
    return lambda: compose({**BASE_HEADERS, "Content-Type": content_type}, body)


ONE_RULE_EACH = {
    "spf_fail": with_headers(Authentication_Results="mx; spf=fail; dkim=pass; dmarc=pass"),
    "spf_softfail": with_headers(Authentication_Results="mx; spf=softfail; dkim=pass"),
    "dkim_fail": with_headers(Authentication_Results="mx; spf=pass; dkim=fail; dmarc=pass"),
    "dmarc_fail": with_headers(Authentication_Results="mx; spf=pass; dkim=pass; dmarc=fail"),
    "from_missing": with_headers(From=None, Return_Path=None),
    "return_path_mismatch": with_headers(Return_Path="<bounce@elsewhere.example>"),
    "reply_to_mismatch": with_headers(Reply_To="claims@elsewhere.example"),
    "recipient_not_listed": with_headers(To="team@tenant-a.test"),
    "many_recipients": with_headers(
        To=", ".join([ALICE] + [f"user{i}@tenant-a.test" for i in range(10)])
    ),
    "subject_keywords": with_headers(Subject="Claim your prize today"),
    "body_keywords": with_body("Dear friend, a wire transfer awaits you.\n"),
    "subject_all_caps": with_headers(Subject="LUNCH ON THURSDAY?"),
    "link_ip_literal": with_body("See http://192.0.2.55/menu.html\n"),
    "link_text_mismatch": with_body(
        '<p><a href="https://tracker.elsewhere.example/r">www.tenant-a.test/menu</a></p>',
        "text/html; charset=utf-8",
    ),
    "message_id_missing": with_headers(Message_ID=None),
}


def test_the_base_message_fires_no_rule():
    verdict = score_message(compose(BASE_HEADERS), recipient=ALICE)
    assert verdict.reasons == ()
    assert verdict.score == 0.0
    assert not verdict.is_spam


def test_every_rule_has_a_case():
    assert set(ONE_RULE_EACH) == {rule.name for rule in RULES}


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: rule.name)
def test_each_rule_fires_alone_with_its_weight(rule):
    verdict = score_message(ONE_RULE_EACH[rule.name](), recipient=ALICE)
    assert verdict.reasons == (rule.name,)
    assert verdict.score == rule.weight


@pytest.mark.parametrize(
    ("raw", "silent_rule"),
    [
        # Only the topmost Authentication-Results counts: lower ones came with the message.
        (
            b"Authentication-Results: mx.tenant-a.test; spf=pass; dkim=pass; dmarc=pass\r\n"
            + with_headers(Authentication_Results="evil.example; spf=fail; dmarc=fail")(),
            "spf_fail",
        ),
        # Bounces have an empty Return-Path: nothing to compare.
        (with_headers(Return_Path="<>")(), "return_path_mismatch"),
        # Subdomains of the sender's domain are the same sender.
        (with_headers(Return_Path="<b-1@bounce.tenant-a.test>")(), "return_path_mismatch"),
        # Mailing lists are addressed to the list, not to the reader.
        (
            with_headers(To="list@lists.example", List_Id="<l.lists.example>")(),
            "recipient_not_listed",
        ),
        # A single keyword in a body is not enough.
        (with_body("Click here for the menu.\n")(), "body_keywords"),
        # Short all-caps subjects ("FYI", "RE: OK") are common in real mail.
        (with_headers(Subject="FYI: OK")(), "subject_all_caps"),
        # Link text that is not a domain ("Read more") claims nothing.
        (
            with_body('<a href="https://other.example/x">Read more</a>', "text/html")(),
            "link_text_mismatch",
        ),
    ],
)
def test_rules_stay_silent_where_they_should(raw, silent_rule):
    assert silent_rule not in score_message(raw, recipient=ALICE).reasons


def test_recipient_match_ignores_case_and_display_names():
    raw = with_headers(To="ALICE@Tenant-A.test")()
    assert (
        "recipient_not_listed"
        not in score_message(raw, recipient="Alice <alice@tenant-a.test>").reasons
    )


def test_malformed_input_is_scored_not_raised():
    verdict = score_message(b"\x00\xff garbage without headers\r\n\r\n\x80\x81", recipient=ALICE)
    assert "from_missing" in verdict.reasons
    broken_charset = with_body("caf\xe9", "text/plain; charset=no-such-charset")()
    assert score_message(broken_charset, recipient=ALICE).reasons == ()


def test_the_module_docstring_lists_every_rule_with_its_weight():
    doc = rules.__doc__ or ""
    for rule in RULES:
        assert re.search(rf"^\s+{rule.name}\s+{rule.weight:.1f}\s", doc, re.MULTILINE), rule.name
    assert f"({THRESHOLD:.1f})" in doc
