"""`mailworker mail ls` as an operator runs it: a subprocess against the session's PostgreSQL.

Rows are written the way sync and classify_spam leave them; the listing must show headers and
verdicts, filter by verdict and folder, and never print a body. About 3 s (5 subprocesses).
"""

import json
import time
import uuid
from datetime import UTC, datetime, timedelta

from mailworker.db.models import MailAccount, Message
from sqlalchemy import update
from sqlalchemy.orm import Session

from tests.test_cli import mailworker

BODY = "the body must never be listed 7f3a"


def _message(account: MailAccount, uid: int, **fields) -> Message:
    defaults = {
        "id": uuid.uuid4(),
        "tenant_id": account.tenant_id,
        "account_id": account.id,
        "folder": "INBOX",
        "uidvalidity": 1,
        "uid": uid,
        "message_id": f"<{uid}@lab.test>",
        "recipients": account.email,
        "headers": "",
        "body_text": BODY,
        "raw": BODY.encode(),
        "size": len(BODY),
        "flags": [],
        "state": "present",
    }
    return Message(**{**defaults, **fields})


def test_mail_ls_lists_headers_and_verdicts_never_bodies(app_env, migrated_db, db_engine):
    tenant = f"mail-ls-{time.time_ns()}"
    address = "carol@lab.test"
    added = mailworker(
        "account", "add", "--tenant", tenant, "--user", address,
        "--imap-host", "imap.invalid", "--smtp-host", "smtp.invalid", "--password-stdin",
        env=app_env, stdin="pw\n",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    ids = dict(line.split("=", 1) for line in added.stdout.splitlines())
    now = datetime.now(UTC).replace(microsecond=0)
    with Session(db_engine) as session, session.begin():
        # Its servers do not exist: keep the periodic fan-out of other tests away from it.
        session.execute(
            update(MailAccount).where(MailAccount.id == ids["account_id"]).values(active=False)
        )
        account = session.get(MailAccount, uuid.UUID(ids["account_id"]))
        session.add_all([
            _message(account, 1, date=now - timedelta(hours=2), sender="alice@lab.test",
                     subject="Minutes of the meeting", is_spam=False, spam_score=0.0,
                     spam_reasons=[]),
            _message(account, 2, date=now - timedelta(hours=1), sender="win@prize.invalid",
                     subject="YOU HAVE WON THE LOTTERY", is_spam=True, spam_score=6.5,
                     spam_reasons=["subject_keywords", "subject_all_caps"], folder="Junk",
                     state="junk"),
            _message(account, 3, date=now, sender="bob@lab.test", subject="Lunch?"),
        ])  # fmt: skip

    table = mailworker("mail", "ls", "--account", address, "--tenant", tenant, env=app_env)
    assert table.returncode == 0, table.stderr
    assert BODY not in table.stdout
    lines = table.stdout.splitlines()
    assert lines[0] == f"{address} (tenant {tenant}): 3 of 3 message(s)"
    assert f"account_id={ids['account_id']}" in lines[1]
    assert lines[2].split() == ["ID", "FOLDER", "UID", "DATE", "FROM", "SPAM", "STATE", "SUBJECT"]
    # Newest first; the verdict column says spam/ham and the score, `-` when not classified.
    cells = [" ".join(line.split()) for line in lines[3:]]
    assert [line.split()[2] for line in cells] == ["3", "2", "1"]
    assert cells[0].endswith("bob@lab.test - present Lunch?")
    assert cells[1].endswith("win@prize.invalid spam 6.5 junk YOU HAVE WON THE LOTTERY")
    assert cells[2].endswith("alice@lab.test ham 0.0 present Minutes of the meeting")

    as_json = mailworker(
        "mail", "ls", "--account", address, "--verdict", "spam", "--json", env=app_env
    )
    assert as_json.returncode == 0, as_json.stderr
    listed = json.loads(as_json.stdout)
    assert BODY not in as_json.stdout
    assert listed["account"]["user_id"] == ids["user_id"]
    assert listed["total"] == 1
    (spam,) = listed["messages"]
    assert (spam["folder"], spam["uid"], spam["is_spam"]) == ("Junk", 2, True)
    assert spam["spam_reasons"] == ["subject_keywords", "subject_all_caps"]

    limited = mailworker(
        "mail", "ls", "--account", address, "--folder", "INBOX", "--limit", "1", "--json",
        env=app_env,
    )  # fmt: skip
    shown = json.loads(limited.stdout)
    assert (shown["total"], [m["uid"] for m in shown["messages"]]) == (2, [3])

    present = mailworker(
        "mail", "ls", "--account", address, "--state", "present", "--verdict", "ham", "--json",
        env=app_env,
    )  # fmt: skip
    assert [m["uid"] for m in json.loads(present.stdout)["messages"]] == [1]

    unknown = mailworker("mail", "ls", "--account", "nobody@lab.test", env=app_env)
    assert unknown.returncode == 1
    assert unknown.stderr.strip() == (
        "Error: no account nobody@lab.test (see `mailworker account list`)"
    )
