"""Mailboxes for the mail phases: Dovecot users registered with `mailworker account add`.

Each account is registered as an operator does it: a Dovecot user, then `mailworker account add`
with the password on stdin (IMAP and SMTP with STARTTLS, the SMTP server's relay login). The
command runs in this process through click's runner (the same command and code, without a Python
start-up per account, so thousands register in a minute). Messages are put in place over IMAP
APPEND, the way a mail client files them, before anything is timed.
"""

from __future__ import annotations

import imaplib
import json
import ssl
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

from click.testing import CliRunner
from mailworker.cli.main import cli

from bench.mail_messages import sample_message
from bench.mailstack import MailStack
from tests.fixtures.servers import Account

ACCOUNTS_PER_TENANT = 100


def register(stack: MailStack, count: int, prefix: str) -> list[Account]:
    """`count` new Dovecot users, each registered with `mailworker account add`."""
    runner = CliRunner()
    env = stack.settings_env()
    accounts = []
    for index in range(count):
        domain = f"{prefix}-{index // ACCOUNTS_PER_TENANT}.test"
        user = stack.dovecot.add_user(f"{prefix}{index}@{domain}")
        argv = [
            "account", "add",
            "--tenant", domain,
            "--user", user.address,
            "--imap-host", stack.dovecot.host,
            "--imap-port", str(stack.dovecot.port),
            "--imap-security", "starttls",
            "--smtp-host", stack.smtp.host,
            "--smtp-port", str(stack.smtp.port),
            "--smtp-security", "starttls",
            "--smtp-username", stack.smtp.username,
            "--password-stdin",
        ]  # fmt: skip
        result = runner.invoke(
            cli, argv, input=f"{user.password}\n{stack.smtp.password}\n", env=env
        )
        if result.exit_code != 0:
            raise RuntimeError(f"mailworker account add failed: {result.output}")
        ids = dict(line.split("=", 1) for line in result.output.split())
        accounts.append(
            Account(
                ids["tenant_id"], ids["user_id"], ids["account_id"], user.address, user.password
            )
        )
    return accounts


def write_accounts(accounts: list[Account], path: Path) -> None:
    """The accounts, passwords included, for a plain loop process (a file only root reads)."""
    path.write_text(json.dumps([asdict(account) for account in accounts]))
    path.chmod(0o600)


def read_accounts(path: Path) -> list[Account]:
    return [Account(**item) for item in json.loads(path.read_text())]


def _append(stack: MailStack, account: Account, count: int) -> None:
    context = ssl.create_default_context(cafile=str(stack.certificates.ca_file))
    with imaplib.IMAP4(stack.dovecot.host, stack.dovecot.port, timeout=30) as conn:
        conn.starttls(context)
        conn.login(account.address, account.password)
        for number in range(count):
            typ, data = conn.append("INBOX", None, None, sample_message(account.address, number))
            if typ != "OK":
                raise RuntimeError(f"APPEND for {account.address} failed: {data!r}")
        conn.logout()


def fill_mailboxes(stack: MailStack, accounts: list[Account], per_mailbox: int) -> None:
    """Put `per_mailbox` new messages in each account's INBOX (IMAP APPEND, untimed)."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        for future in [pool.submit(_append, stack, a, per_mailbox) for a in accounts]:
            future.result(timeout=120)
