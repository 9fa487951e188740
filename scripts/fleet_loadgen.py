"""Load for the fleet scenario's faults: submit real tasks at a steady rate, then count effects.

Runs on an application host with the deployed virtualenv's Python and the units' settings file:
    /opt/mailworker/venv/bin/python fleet_loadgen.py submit --account T U A --out run.json
    /opt/mailworker/venv/bin/python fleet_loadgen.py count run.json --imap-host HOST
`submit` stores each message in the outbox and queues send_email for it (as `mailworker task
send-email` does), with one sync_mailbox every --sync-every sends, at --rate tasks a second, until
--count tasks, --seconds or --stop-file, whichever comes first. A submission the app refused (the
database was down) was never accepted: it is counted apart, not as lost. `count` waits until every
accepted task has finished or --wait seconds have passed, then checks each one's effects:
- the SMTP sink's mailbox, read over IMAP, holds exactly one message with each send's Message-ID
  (none: lost; two: sent twice), and its outbox row says `sent`, or `unknown`: a worker killed
  between the data's final "." and its record of the server's reply cannot know whether the
  server took the message, and the app, sending at most once, asks an operator instead of
  resending (counted apart, `unknown_delivered_once`; any other status is lost);
- after one last sync (one that ran: a sync that found another running is sent again), the
  `messages` table holds exactly one row per Message-ID (no duplicate);
- each sync task ended in SUCCESS (else lost).
It also lists when each task was accepted and when it ended (`timeline`; the syncs alone in
`sync_timeline`), so that a fault test can tell which tasks waited for a frozen host, and whether a
lost sync was still queued when a worker was killed (the sync queue is first in, first out).
It prints the counts as one JSON object and exits 1 when any task was lost or doubled. The run
file keeps the time (epoch seconds) each task was accepted, and the counts list those of the lost
ones (`lost_accepted_at`), so that a fault test can tell what a Redis failover may lose (accepted
just before the master froze) from a real loss.
The IMAP password is read from the environment (LOADGEN_IMAP_PASSWORD), never from arguments.
`submit` writes its process id next to the run file (RUN.pid) once it is about to submit the first
task, and dumps every thread's stack to stderr on SIGUSR1, so that a test can show where a
producer that overran is stuck.
"""

from __future__ import annotations

import argparse
import faulthandler
import imaplib
import json
import os
import re
import signal
import sys
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

DEFAULT_ENV_FILE = Path("/etc/mailworker/mailworker.env")
SEND_EMAIL = "mailworker.tasks.send.send_email"
SYNC_MAILBOX = "mailworker.tasks.sync.sync_mailbox"
FINAL_STATES = {"SUCCESS", "FAILURE", "REVOKED"}
SEND_FINAL = {"sent", "unknown", "failed"}  # outbox statuses no attempt changes any more
MESSAGE_ID = re.compile(rb"^Message-ID:\s*(<[^>]+>)", re.IGNORECASE | re.MULTILINE)


def _load_env(files: list[Path]) -> None:
    from mailworker.ops.envfile import load_env_file  # noqa: PLC0415 - after sys.path is set

    for path in files:
        load_env_file(path, os.environ, override=True)


def submit(args: argparse.Namespace) -> dict[str, Any]:
    from celery.result import denied_join_result  # noqa: PLC0415
    from mailworker.celery_app import app  # noqa: PLC0415 - the settings come first
    from mailworker.services import outbox  # noqa: PLC0415
    from mailworker.settings import load_settings  # noqa: PLC0415

    settings = load_settings()
    # Ready: a test waits for this file before its fault (the imports take seconds on a busy host).
    args.out.with_suffix(".pid").write_text(f"{os.getpid()}\n", encoding="utf-8")
    tenant, user, account = (uuid.UUID(value) for value in args.account)
    ids = [str(tenant), str(user), str(account)]
    sends: list[dict[str, Any]] = []
    syncs: list[dict[str, Any]] = []
    refused: list[str] = []
    started = time.monotonic()
    for number in range(args.count):
        due = started + number / args.rate
        if due - started > args.seconds or (args.stop_file and args.stop_file.exists()):
            break
        time.sleep(max(0.0, due - time.monotonic()))
        if args.sync_every and number % args.sync_every == args.sync_every - 1:
            try:
                with denied_join_result():
                    task_id = app.send_task(SYNC_MAILBOX, args=ids, retry=False).id
                syncs.append({"id": task_id, "at": time.time()})
            except Exception as error:  # the broker refused it: counted, not lost
                refused.append(f"sync {number}: {type(error).__name__}")
            continue
        published: list[str] = []

        def publish(task_args: list[str], published: list[str] = published) -> None:
            # This process never waits for a result (the workers still store them; `count` reads
            # them). Outside denied_join_result, send_task subscribes to each task's result
            # channel, and after a connection error the result consumer reconnects and re-reads
            # the results it holds, up to 20 tries, each blocked up to the socket timeout while
            # the old master is frozen.
            with denied_join_result():
                published.append(app.send_task(SEND_EMAIL, args=task_args, retry=False).id)

        spec = {
            "to": ["bob@example.test"],
            "subject": f"{args.tag} {number}",
            "body": f"fleet load {args.tag} message {number}",
        }
        try:
            stored = outbox.submit_send(settings, tenant, user, account, spec, publish=publish)
        except Exception as error:  # the database was unreachable: the caller was told
            refused.append(f"send {number}: {type(error).__name__}")
            continue
        sends.append(
            {
                "outbox_id": str(stored.outbox_id),
                "message_id": stored.message_id,
                "at": time.time(),
            }
        )
    return {
        "account": ids,
        "tag": args.tag,
        "sends": sends,
        "syncs": syncs,
        "refused": refused,
        "seconds": round(time.monotonic() - started, 1),
    }


def _send_states(run: dict[str, Any]) -> dict[str, str]:
    from mailworker.db.engine import session_scope  # noqa: PLC0415
    from mailworker.db.models import SentMessage  # noqa: PLC0415
    from mailworker.settings import load_settings  # noqa: PLC0415
    from sqlalchemy import select  # noqa: PLC0415

    wanted = [uuid.UUID(send["outbox_id"]) for send in run["sends"]]
    with session_scope(load_settings()) as session:
        rows = session.execute(
            select(SentMessage.id, SentMessage.status).where(SentMessage.id.in_(wanted))
        ).all()
    return {str(row_id): status for row_id, status in rows}


def _sync_states(run: dict[str, Any]) -> dict[str, str]:
    from mailworker.celery_app import app  # noqa: PLC0415

    return {sync["id"]: app.AsyncResult(sync["id"]).state for sync in run["syncs"]}


def _timeline(
    run: dict[str, Any], kinds: tuple[str, ...] = ("sends", "syncs")
) -> list[list[float | None]]:
    """[accepted, ended] (epoch seconds) of every task of KINDS in the order accepted; ended is
    when a send's row was recorded `sent`, or a sync's result stored; None while it has not."""
    from mailworker.celery_app import app  # noqa: PLC0415
    from mailworker.db.engine import session_scope  # noqa: PLC0415
    from mailworker.db.models import SentMessage  # noqa: PLC0415
    from mailworker.settings import load_settings  # noqa: PLC0415
    from sqlalchemy import select  # noqa: PLC0415

    wanted = [uuid.UUID(send["outbox_id"]) for send in run["sends"]]
    with session_scope(load_settings()) as session:
        rows = session.execute(
            select(SentMessage.id, SentMessage.sent_at).where(SentMessage.id.in_(wanted))
        ).all()
    ended: dict[str, float | None] = {
        str(row_id): sent_at.timestamp() if sent_at else None for row_id, sent_at in rows
    }
    for sync in run["syncs"]:
        done = app.AsyncResult(sync["id"]).date_done
        if isinstance(done, str):
            done = datetime.fromisoformat(done)
        if done is not None and done.tzinfo is None:
            done = done.replace(tzinfo=UTC)  # Celery stores it in UTC
        ended[sync["id"]] = done.timestamp() if done else None
    tasks = [(send["at"], send["outbox_id"]) for send in run["sends"] if "sends" in kinds]
    tasks += [(sync["at"], sync["id"]) for sync in run["syncs"] if "syncs" in kinds]
    timeline: list[list[float | None]] = []
    for at, key in sorted(tasks):
        end = ended.get(key)
        timeline.append([round(at, 1), None if end is None else round(end, 1)])
    return timeline


def _deliveries(host: str, port: int, user: str, password: str) -> Counter[str]:
    """Message-IDs in the sink's INBOX over IMAP (one FETCH of that header for all messages)."""
    seen: Counter[str] = Counter()
    with imaplib.IMAP4(host, port, timeout=30) as imap:
        imap.login(user, password)
        _, exists = imap.select("INBOX", readonly=True)
        if int(exists[0] or 0) == 0:  # FETCH 1:* of an empty mailbox is an error
            return seen
        _, data = imap.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
        for item in data:
            if isinstance(item, tuple):
                found = MESSAGE_ID.search(item[1])
                if found:
                    seen[found.group(1).decode()] += 1
    return seen


def _stored_rows(run: dict[str, Any]) -> Counter[str]:
    from mailworker.db.engine import session_scope  # noqa: PLC0415
    from mailworker.db.models import Message  # noqa: PLC0415
    from mailworker.settings import load_settings  # noqa: PLC0415
    from sqlalchemy import func, select  # noqa: PLC0415

    wanted = [send["message_id"] for send in run["sends"]]
    with session_scope(load_settings()) as session:
        rows = session.execute(
            select(Message.message_id, func.count())
            .where(
                Message.account_id == uuid.UUID(run["account"][2]),
                Message.message_id.in_(wanted),
            )
            .group_by(Message.message_id)
        ).all()
    return Counter({message_id: count for message_id, count in rows})


def _final_sync(run: dict[str, Any], timeout: float) -> tuple[str, int]:
    """One last sync of the run's account that ran: its state, and how many did not run first.
    A sync that finds another one of the account running stores nothing (services/sync.py): a
    copy that a woken host still runs, or the periodic one. It is sent again until one runs."""
    from mailworker.celery_app import app  # noqa: PLC0415

    deadline = time.monotonic() + timeout
    not_run = 0
    while True:
        result = app.send_task(SYNC_MAILBOX, args=run["account"], retry=False)
        try:
            value = result.get(timeout=max(1.0, deadline - time.monotonic()), propagate=False)
        except Exception as error:  # reported in the counts
            return type(error).__name__, not_run
        if result.state != "SUCCESS" or not (isinstance(value, dict) and "not_run" in value):
            return str(result.state), not_run
        not_run += 1
        if time.monotonic() >= deadline:
            return "NOT_RUN", not_run
        time.sleep(2)


def count(args: argparse.Namespace) -> dict[str, Any]:
    run = json.loads(Path(args.run).read_text(encoding="utf-8"))
    started = time.monotonic()
    deadline = started + args.wait
    while True:
        sends = _send_states(run)
        syncs = _sync_states(run)
        pending = sum(1 for status in sends.values() if status not in SEND_FINAL) + sum(
            1 for state in syncs.values() if state not in FINAL_STATES
        )
        if pending == 0 or time.monotonic() >= deadline:
            break
        time.sleep(2)
    waited = round(time.monotonic() - started, 1)
    password = os.environ["LOADGEN_IMAP_PASSWORD"]
    delivered = _deliveries(args.imap_host, args.imap_port, args.imap_user, password)
    final_sync, final_sync_not_run = _final_sync(run, args.final_wait)
    rows = _stored_rows(run)
    message_ids = [send["message_id"] for send in run["sends"]]
    statuses = Counter(sends.get(send["outbox_id"], "missing") for send in run["sends"])
    counts = {
        "tag": run["tag"],
        "submitted_sends": len(run["sends"]),
        "submitted_syncs": len(run["syncs"]),
        "refused_at_submission": len(run["refused"]),
        "submit_seconds": run["seconds"],
        "wait_seconds": waited,
        "send_status": dict(statuses),
        "delivered_once": sum(1 for mid in message_ids if delivered[mid] == 1),
        "delivered_twice_or_more": sum(1 for mid in message_ids if delivered[mid] > 1),
        "not_delivered": sum(1 for mid in message_ids if delivered[mid] == 0),
        "final_sync": final_sync,
        "final_sync_not_run": final_sync_not_run,
        "rows_once": sum(1 for mid in message_ids if rows[mid] == 1),
        "rows_duplicated": sum(1 for mid in message_ids if rows[mid] > 1),
        "rows_missing": sum(1 for mid in message_ids if rows[mid] == 0),
        "sync_states": dict(Counter(syncs.values())),
        "timeline": _timeline(run),
        "sync_timeline": _timeline(run, ("syncs",)),
    }
    counts["unknown_delivered_once"] = sum(
        1
        for send in run["sends"]
        if sends.get(send["outbox_id"]) == "unknown" and delivered[send["message_id"]] == 1
    )
    lost_at = [
        send["at"]
        for send in run["sends"]
        if sends.get(send["outbox_id"]) not in ("sent", "unknown")
        or delivered[send["message_id"]] == 0
    ]
    lost_syncs_at = [sync["at"] for sync in run["syncs"] if syncs.get(sync["id"]) != "SUCCESS"]
    lost_at += lost_syncs_at
    counts["lost"] = len(lost_at)
    counts["lost_syncs_accepted_at"] = sorted(lost_syncs_at)
    counts["lost_accepted_at"] = sorted(lost_at)
    counts["doubled"] = counts["delivered_twice_or_more"] + counts["rows_duplicated"]
    counts["ok"] = (
        counts["lost"] == 0
        and counts["doubled"] == 0
        and counts["delivered_once"] == len(message_ids)
        and counts["rows_once"] == len(message_ids)
    )
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--env-file", type=Path, action="append", help=f"Settings file (default {DEFAULT_ENV_FILE})"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("submit", help="Submit tasks at a steady rate; write the run file.")
    run.add_argument("--account", nargs=3, metavar=("TENANT", "USER", "ACCOUNT"), required=True)
    run.add_argument("--rate", type=float, default=2.0, help="Tasks a second.")
    run.add_argument("--count", type=int, default=40, help="Most tasks submitted.")
    run.add_argument("--seconds", type=float, default=30.0, help="Most seconds spent submitting.")
    run.add_argument("--stop-file", type=Path, help="Stop submitting once this file exists.")
    run.add_argument("--sync-every", type=int, default=5, help="One sync in this many tasks.")
    run.add_argument("--tag", default=uuid.uuid4().hex[:8], help="Subject prefix of the run.")
    run.add_argument("--out", type=Path, required=True, help="Run file (JSON) for `count`.")
    check = commands.add_parser("count", help="Wait for the run's tasks; count their effects.")
    check.add_argument("run", help="The run file `submit` wrote.")
    check.add_argument("--wait", type=float, default=120.0, help="Most seconds to wait.")
    check.add_argument(
        "--final-wait", type=float, default=120.0, help="Most seconds for the last sync."
    )
    check.add_argument("--imap-host", required=True)
    check.add_argument("--imap-port", type=int, default=1143)
    check.add_argument("--imap-user", default="alice@example.test")
    options = parser.parse_args(argv)
    _load_env(options.env_file or [DEFAULT_ENV_FILE])
    if options.command == "submit":
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        result = submit(options)
        options.out.write_text(json.dumps(result), encoding="utf-8")
        print(
            json.dumps(
                {
                    key: len(value) if isinstance(value, list) else value
                    for key, value in result.items()
                    if key != "account"
                }
            )
        )
        return 0
    counts = count(options)
    print(json.dumps(counts, sort_keys=True))
    return 0 if counts["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
