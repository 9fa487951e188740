#!/usr/bin/env python3
"""TEST-ONLY SMTP sink of the Molecule scenarios.

Listens on SMTP_SINK_ADDRESS, port 2525 (127.0.0.1 unless set: the fleet scenario's data host
sets it, so that its workers reach the sink over the scenario's private network). Accepts every
message from the test user (AUTH PLAIN/LOGIN without TLS: loopback or a lab-only network) and
delivers it into the INBOX (a Maildir) of the test IMAP user, so that a `send` task can be
followed by a `sync` task that finds it, and a duplicate delivery shows as two files with one
Message-ID. A message for slow@example.test is held SMTP_SINK_SLOW_SECONDS before the 250 reply:
a task that runs long enough to stop its worker in the middle of it.
"""

from __future__ import annotations

import asyncio
import mailbox
import os
import signal

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

MAILDIR = "/srv/testmail/mail/alice@example.test"
SLOW_RECIPIENT = "slow@example.test"
SLOW_SECONDS = float(os.environ.get("SMTP_SINK_SLOW_SECONDS", "20"))
ADDRESS = os.environ.get("SMTP_SINK_ADDRESS", "127.0.0.1")
USERS = {b"alice@example.test": b"lab-only-imap"}


def authenticate(server, session, envelope, mechanism, auth_data):
    ok = isinstance(auth_data, LoginPassword) and USERS.get(auth_data.login) == auth_data.password
    return AuthResult(success=ok)


class Deliver:
    async def handle_DATA(self, server, session, envelope):
        if SLOW_RECIPIENT in envelope.rcpt_tos:
            await asyncio.sleep(SLOW_SECONDS)
        box = mailbox.Maildir(MAILDIR, create=True)
        box.add(envelope.original_content or envelope.content)
        box.close()
        return "250 OK delivered"


def main() -> None:
    controller = Controller(
        Deliver(),
        hostname=ADDRESS,
        port=2525,
        authenticator=authenticate,
        auth_required=True,
        auth_require_tls=False,
    )
    controller.start()
    stop = asyncio.Event()
    loop = asyncio.new_event_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.run_until_complete(stop.wait())
    controller.stop()


if __name__ == "__main__":
    main()
