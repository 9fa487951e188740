"""What puts the real tasks in the queue, as the deployment does it, in a process of its own.

- `fanout`: runs the task beat sends every MAILWORKER_SYNC_INTERVAL, sync_all_accounts, here
  (Task.apply: its body, its ledger row), so it queues one sync_mailbox per active account with
  the shipped expiry (the interval).
- `send`: stores each mail in the outbox and queues its send_email with `submit_send`, what a
  client of the fleet calls.

Runs with a worker unit's environment. Prints one JSON line: {"queued": N, "seconds": S}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path

from bench.mail_accounts import Account, read_accounts
from bench.mail_messages import send_spec


def fanout() -> int:
    from mailworker.tasks.periodic import sync_all_accounts  # noqa: PLC0415 - reads the env

    result = sync_all_accounts.apply(throw=True).get()
    return int(result["queued"])


def submit(accounts: list[Account], count: int) -> int:
    from mailworker.settings import load_settings  # noqa: PLC0415
    from mailworker.tasks.send import submit_send  # noqa: PLC0415

    settings = load_settings()
    for index in range(count):
        account = accounts[index % len(accounts)]
        submission = submit_send(
            settings,
            uuid.UUID(account.tenant_id),
            uuid.UUID(account.user_id),
            uuid.UUID(account.account_id),
            send_spec(index),
        )
        if not submission.published:
            raise RuntimeError(f"send {index} was stored but not queued: {submission}")
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.mail_produce")
    parser.add_argument("what", choices=("fanout", "send"))
    parser.add_argument("--accounts", type=Path, help="send: the accounts file")
    parser.add_argument("--count", type=int, default=0, help="send: how many mails")
    options = parser.parse_args(argv)
    start = time.perf_counter()
    if options.what == "fanout":
        queued = fanout()
    else:
        queued = submit(read_accounts(options.accounts), options.count)
    json.dump({"queued": queued, "seconds": time.perf_counter() - start}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
