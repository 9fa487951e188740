#!/usr/bin/python3
"""LAB ONLY: seed the lab mailboxes with ham and spam through the local Postfix, once.

Deterministic (the same messages on every lab): each mailbox gets --per-user messages dated over
the last 30 days; every --spam-every-th one is spam that the app's rules (spam/rules.py) score
at 5.0 or more (spammy all-capitals subject, two body phrases, a Reply-To elsewhere, a link to an
IP address), the rest is ham from the other lab users or a mailing list. The envelope sender is
the From address, so Dovecot's Return-Path agrees with it. After Postfix has taken every message,
waits until its queue is empty (delivered into Dovecot), then writes --marker.
"""

import argparse
import json
import random
import smtplib
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path

HAM_SUBJECTS = (
    "Minutes of Monday's meeting",
    "Lunch on Thursday?",
    "Draft of the quarterly report",
    "Re: server migration plan",
    "Photos from the trip",
    "Invoice 2026-{n:04d}",
    "Agenda for the review",
    "Notes on the new build",
)
HAM_BODIES = (
    "Hi,\n\nattached are my notes; comments welcome before Friday.\n\nThanks",
    "Hello,\n\nthe meeting moved to room 4. See you there.\n",
    "Hi,\n\nI pushed the changes we discussed. The tests pass on my machine.\n",
    "Good morning,\n\nplease find the figures below. Nothing unusual this month.\n",
)
SPAM = (
    ("YOU HAVE WON THE LOTTERY", "winner@prize-office.example"),
    ("CLAIM YOUR PRIZE TODAY", "claims@lucky-draw.example"),
    ("ACCOUNT SUSPENDED VERIFY YOUR ACCOUNT", "security@bank-alerts.example"),
    ("URGENT INHERITANCE FOR YOU", "lawyer@estate-desk.example"),
    ("CRYPTO INVESTMENT DOUBLE YOUR MONEY", "advisor@coin-growth.example"),
)
# Every LIST_EVERY-th ham message comes from a mailing list (List-Id).
LIST_EVERY = 4
SPAM_BODY = (
    "Dear friend,\n\nyou have won one million dollars in our lottery. To claim your prize, "
    "send your bank details for the wire transfer. Act now, this is a limited time offer: "
    "http://192.0.2.{n}/claim\n"
)


def build(
    index: int, user: str, *, users: list[str], domain: str, spam_every: int, rng: random.Random
) -> tuple[str, str, EmailMessage]:
    """Message `index` of `user`'s mailbox: (envelope sender, recipient, message)."""
    recipient = f"{user}@{domain}"
    message = EmailMessage()
    sent = datetime.now(UTC) - timedelta(minutes=rng.randint(5, 30 * 24 * 60))
    spam = (index + 1) % spam_every == 0
    if spam:
        subject, sender = SPAM[index // spam_every % len(SPAM)]
        message["From"] = sender
        message["Reply-To"] = f"reply@collect-{index % 7}.example"
        message.set_content(SPAM_BODY.format(n=index % 250 + 1))
    else:
        others = [other for other in users if other != user]
        if index % LIST_EVERY == LIST_EVERY - 1:
            sender = f"announce@lists.{domain}"
            message["List-Id"] = f"Lab announcements <announce.lists.{domain}>"
            subject = f"[announce] Weekly digest {index}"
        else:
            sender = f"{others[index % len(others)]}@{domain}"
            subject = HAM_SUBJECTS[index % len(HAM_SUBJECTS)].format(n=index)
        message["From"] = sender
        message.set_content(HAM_BODIES[index % len(HAM_BODIES)])
    message["To"] = recipient
    message["Subject"] = subject
    message["Date"] = format_datetime(sent)
    message["Message-ID"] = make_msgid(idstring=f"seed-{user}-{index}", domain=domain)
    return sender, recipient, message


def queue_empty() -> bool:
    listed = subprocess.run(
        ["/usr/sbin/postqueue", "-j"], capture_output=True, text=True, check=True
    )
    return not listed.stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", required=True)
    parser.add_argument("--users", required=True, help="comma-separated local parts")
    parser.add_argument("--per-user", type=int, required=True)
    parser.add_argument("--spam-every", type=int, required=True)
    parser.add_argument("--port", type=int, default=25)
    parser.add_argument("--marker", type=Path, required=True)
    parser.add_argument("--timeout", type=float, default=180)
    args = parser.parse_args()
    users = args.users.split(",")
    rng = random.Random(20261201)  # noqa: S311 - the same lab mail every time, not a secret
    counts = {"ham": 0, "spam": 0}
    with smtplib.SMTP("127.0.0.1", args.port, timeout=30) as smtp:
        for user in users:
            for index in range(args.per_user):
                sender, recipient, message = build(
                    index,
                    user,
                    users=users,
                    domain=args.domain,
                    spam_every=args.spam_every,
                    rng=rng,
                )
                smtp.send_message(message, from_addr=sender, to_addrs=[recipient])
                counts["spam" if (index + 1) % args.spam_every == 0 else "ham"] += 1
    deadline = time.monotonic() + args.timeout
    while not queue_empty():
        if time.monotonic() > deadline:
            print(
                f"Postfix's queue is not empty after {args.timeout:g} s: see `postqueue -p`",
                file=sys.stderr,
            )
            return 1
        time.sleep(1)
    args.marker.parent.mkdir(parents=True, exist_ok=True)
    args.marker.write_text(json.dumps({"users": users, **counts}) + "\n", encoding="utf-8")
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
