"""The physical limit: plain imaplib and smtplib loops against the same servers, no Celery, no DB.

`python -m bench.plain_loops imap|smtp ...` is one loop process; it runs `--threads` loops over its
share of the work and prints {"started": t0, "finished": t1, "items": n} (Unix times). The
harness starts several at once (`run_plain`), each told to begin at the same moment, so the
limit is measured at a given number of loops in parallel, spread over the cores like the
shipped worker's two processes.

- imap: per mailbox what `sync_mailbox` says to the server: connect, STARTTLS, AUTHENTICATE
  PLAIN, EXAMINE INBOX, UID SEARCH, UID FETCH of sizes and flags, UID FETCH of the bodies (PEEK),
  LOGOUT. The fetched messages are written to a file for the harness's COPY into PostgreSQL.
- smtp: per mail the same message `send_email` sends (mailworker.mail.compose.build_message of
  the same spec), to the same server with the same STARTTLS and login; `--reuse` keeps one
  connection per loop (the fastest a client can go), without it each mail has its own session
  like `send_email`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import imaplib
import json
import os
import pickle
import re
import smtplib
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bench.mail_accounts import Account, read_accounts, write_accounts
from bench.mail_messages import send_spec

_UID = re.compile(rb"UID (\d+)")
_SIZE = re.compile(rb"RFC822\.SIZE (\d+)")
_FLAGS = re.compile(rb"FLAGS \(([^)]*)\)")


@dataclass(frozen=True)
class PlainRow:
    """One fetched message, with what the IMAP server said about it."""

    address: str
    uidvalidity: int
    uid: int
    size: int
    flags: tuple[str, ...]
    raw: bytes


@dataclass(frozen=True)
class PlainRun:
    loops: int
    processes: int
    items: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else float("nan")


def _context(ca_file: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=ca_file)


def _number(conn: imaplib.IMAP4, code: str) -> int:
    _, values = conn.response(code)
    return int(values[-1]) if values and values[-1] else 0


def sync_one(host: str, port: int, ca_file: str, account: Account) -> list[PlainRow]:
    conn = imaplib.IMAP4(host, port, timeout=60)
    try:
        conn.starttls(_context(ca_file))
        secret = f"\0{account.address}\0{account.password}".encode()
        conn.authenticate("PLAIN", lambda _: secret)
        conn.select("INBOX", readonly=True)  # EXAMINE, as the sync
        uidvalidity = _number(conn, "UIDVALIDITY")
        _, data = conn.uid("SEARCH", "UID", "1:*")
        uids = [int(word) for word in (data[0] or b"").split()]
        if not uids:
            return []
        uid_set = ",".join(str(uid) for uid in uids)
        _, listed = conn.uid("FETCH", uid_set, "(UID RFC822.SIZE FLAGS)")
        sizes = {}
        for item in listed:
            line = item if isinstance(item, bytes) else b""
            uid, size = _UID.search(line), _SIZE.search(line)
            if uid and size:
                sizes[int(uid.group(1))] = int(size.group(1))
        _, fetched = conn.uid("FETCH", uid_set, "(UID FLAGS BODY.PEEK[])")
        rows = []
        for item in fetched:
            if not isinstance(item, tuple):
                continue
            head, raw = item
            uid_match, flags = _UID.search(head), _FLAGS.search(head)
            if uid_match is None:
                continue
            uid = int(uid_match.group(1))
            flag_list = tuple(flags.group(1).decode().split()) if flags else ()
            rows.append(
                PlainRow(
                    account.address, uidvalidity, uid, sizes.get(uid, len(raw)), flag_list, raw
                )
            )
        conn.logout()
        return rows
    finally:
        with contextlib.suppress(OSError):
            conn.shutdown()


def send_all(
    host: str, port: int, ca_file: str, login: tuple[str, str], mails: Sequence[tuple[str, int]],
    *, reuse: bool,
) -> int:  # fmt: skip
    """Send each (sender, number) mail; one session per mail, or one for all with `reuse`."""
    from mailworker.mail.compose import build_message  # noqa: PLC0415

    def session() -> smtplib.SMTP:
        smtp = smtplib.SMTP(host, port, timeout=60)
        smtp.starttls(context=_context(ca_file))
        smtp.login(*login)
        return smtp

    shared = session() if reuse else None
    sent = 0
    for sender, number in mails:
        message = build_message(send_spec(number), sender=sender)
        smtp = shared or session()
        refused = smtp.send_message(message)
        if refused:
            raise RuntimeError(f"the server refused {refused}")
        sent += 1
        if shared is None:
            smtp.quit()
    if shared is not None:
        shared.quit()
    return sent


def _split(items: Sequence[object], parts: int) -> list[list[object]]:
    return [list(items[index::parts]) for index in range(parts) if items[index::parts]]


def _run_threads(threads: int, work: list[list[object]], job: Callable[[list[object]], int]) -> int:
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return sum(pool.map(job, work))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plain_loops")
    parser.add_argument("what", choices=("imap", "smtp"))
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ca-file", required=True)
    parser.add_argument("--accounts", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--start-at", type=float, required=True, help="Unix time to begin")
    parser.add_argument("--rows", type=Path, help="imap: where the fetched messages go")
    parser.add_argument("--mails", type=str, default="", help="smtp: comma-separated numbers")
    parser.add_argument("--login", default="", help="smtp: user, password on stdin")
    parser.add_argument("--reuse", action="store_true", help="smtp: one connection per loop")
    options = parser.parse_args(argv)
    accounts = read_accounts(options.accounts)
    args = (options.host, options.port, options.ca_file)
    rows: list[PlainRow] = []
    if options.what == "imap":

        def job(share: list[object]) -> int:
            found = [row for a in share for row in sync_one(*args, a)]  # type: ignore[arg-type]
            rows.extend(found)
            return len(found)

        work = _split(accounts, options.threads)
    else:
        login = (options.login, sys.stdin.readline().rstrip("\n"))
        numbers = [int(n) for n in options.mails.split(",") if n]
        mails = [(accounts[n % len(accounts)].address, n) for n in numbers]

        def job(share: list[object]) -> int:
            return send_all(*args, login, share, reuse=options.reuse)  # type: ignore[arg-type]

        work = _split(mails, options.threads)
    time.sleep(max(0.0, options.start_at - time.time()))
    started = time.time()
    items = _run_threads(options.threads, work, job)
    finished = time.time()
    if options.rows is not None:
        # Plain tuples: under `python -m` the class would be pickled as __main__.PlainRow.
        options.rows.write_bytes(pickle.dumps([dataclasses.astuple(row) for row in rows]))
    json.dump({"started": started, "finished": finished, "items": items}, sys.stdout)
    sys.stdout.write("\n")
    return 0


def _launch(
    what: str, per_process: list[list[str]], threads: int, stdin: str, timeout: float
) -> PlainRun:
    """Start one loop process per argument list, all beginning at the same moment."""
    start_at = time.time() + 2.0  # after every process has imported what it needs
    children = [
        subprocess.Popen(
            [
                sys.executable, "-m", "bench.plain_loops", what, *arguments,
                f"--threads={threads}", f"--start-at={start_at}",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for arguments in per_process
    ]  # fmt: skip
    reports = []
    try:
        for child in children:
            out, _ = child.communicate(stdin, timeout=timeout)
            if child.returncode != 0:
                raise RuntimeError(f"plain {what} loop exited with {child.returncode}")
            reports.append(json.loads(out))
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    seconds = max(r["finished"] for r in reports) - min(r["started"] for r in reports)
    items = sum(int(r["items"]) for r in reports)
    return PlainRun(threads * len(children), len(children), items, seconds)


def _processes(loops: int) -> int:
    return max(1, min(loops, os.cpu_count() or 1))


def run_plain_imap(
    server: tuple[str, int, str], accounts: list[Account], loops: int, work_dir: Path
) -> tuple[PlainRun, list[PlainRow]]:
    """Read every mailbox with `loops` plain loops; the messages they fetched."""
    host, port, ca_file = server
    per_process = []
    row_files = []
    for index, share in enumerate(_split(accounts, _processes(loops))):
        accounts_file = work_dir / f"plain-imap-{index}.json"
        write_accounts(share, accounts_file)  # type: ignore[arg-type]
        row_files.append(work_dir / f"plain-imap-{index}.rows")
        per_process.append(
            [f"--host={host}", f"--port={port}", f"--ca-file={ca_file}",
             f"--accounts={accounts_file}", f"--rows={row_files[-1]}"]
        )  # fmt: skip
    run = _launch("imap", per_process, max(1, loops // len(per_process)), "", 600.0)
    rows: list[PlainRow] = []
    for path in row_files:
        rows.extend(PlainRow(*fields) for fields in pickle.loads(path.read_bytes()))
        path.unlink()
    return run, rows


def run_plain_smtp(
    server: tuple[str, int, str],
    login: tuple[str, str],
    accounts_file: Path,
    mails: int,
    loops: int,
    *,
    reuse: bool,
) -> PlainRun:
    """Send mails 0..mails-1 with `loops` plain smtplib loops."""
    host, port, ca_file = server
    per_process = []
    for share in _split(list(range(mails)), _processes(loops)):
        per_process.append(
            [f"--host={host}", f"--port={port}", f"--ca-file={ca_file}",
             f"--accounts={accounts_file}", f"--login={login[0]}",
             "--mails=" + ",".join(str(n) for n in share), *(["--reuse"] if reuse else [])]
        )  # fmt: skip
    threads = max(1, loops // len(per_process))
    return _launch("smtp", per_process, threads, login[1] + "\n", 600.0)


if __name__ == "__main__":
    sys.exit(main())
