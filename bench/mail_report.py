"""The mail phases in docs/benchmarks.md: three summary lines and their section of tables."""

from __future__ import annotations

import math
import os
import subprocess
from importlib.metadata import version

from bench.mail_drain import Drain
from bench.mail_figures import (
    IDLE_MAILBOXES_TARGET,
    SEND_RATIO_TARGET,
    SYNC_RATIO_TARGET,
    CpuBudget,
    IdleCapacity,
    ratio,
    verdict,
)
from bench.mail_phases import MailResults, PlainSend

MIB = 1024 * 1024
# The processes measured per run: the shipped workers and the servers they use.
CPU_PARTS = {"workers": "workers", "dovecot": "Dovecot", "postgres": "PostgreSQL"}


def _fmt(value: float, digits: int = 0) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.{digits}f}"


def _best_sync_rate(mail: MailResults) -> float:
    best = mail.plain_sync_best()
    return best.rate if best else math.nan


def _best_send_rate(mail: MailResults, mode: str | None = None) -> float:
    best = mail.plain_send_best(mode)
    return best.run.rate if best else math.nan


def sync_ratio(mail: MailResults) -> float:
    return ratio(mail.shipped_rate("sync"), _best_sync_rate(mail))


def send_ratio(mail: MailResults, mode: str | None = None) -> float:
    return ratio(mail.shipped_rate("send"), _best_send_rate(mail, mode))


def idle_capacity(mail: MailResults) -> IdleCapacity | None:
    drain = mail.idle
    if drain is None:
        return None
    return IdleCapacity(
        drain.queued, mail.idle_within, drain.after_fanout_seconds, mail.sync_interval
    )


def summary_lines(mail: MailResults | None) -> list[str]:
    """Worded exactly as issue 12 asks, so a script can read the figures."""
    if mail is None or mail.skipped:
        reason = mail.skipped if mail is not None else "skipped with --skip-mail"
        return [f"- real mail work (sync, send, idle mailboxes): not measured ({reason})"]
    sync = sync_ratio(mail)
    send = send_ratio(mail)
    capacity = idle_capacity(mail)
    claim = capacity.claim if capacity else 0
    return [
        f"- sync throughput ratio (shipped/imaplib): {_fmt(sync, 2)} "
        f"(target >= {SYNC_RATIO_TARGET}: {verdict(sync, SYNC_RATIO_TARGET)})",
        f"- idle mailboxes kept in sync per worker host: {claim} "
        f"(target >= {IDLE_MAILBOXES_TARGET}: {verdict(claim or math.nan, IDLE_MAILBOXES_TARGET)})",
        f"- send throughput ratio (shipped/smtplib): {_fmt(send, 2)} "
        f"(target >= {SEND_RATIO_TARGET}: {verdict(send, SEND_RATIO_TARGET)})",
    ]


def _tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.split()[0] if out.stdout.split() else "unknown"


def _cpu(drain: Drain, part: str) -> str:
    return _fmt(drain.cpu_ms_per_task(part), 1)


def _memory(drain: Drain) -> str:
    peak = drain.memory.cgroup_peak
    return _fmt(peak / MIB, 0) if peak else "n/a"


SHIPPED_HEADER = [
    "| round | configuration | concurrency | done | s | per s | worker CPU ms/task "
    "| Dovecot CPU ms/task | PostgreSQL CPU ms/task | workers' peak MiB |",
    "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
]


def _shipped_row(number: int, drain: Drain, unit: str) -> str:
    failed = f" ({drain.failed} failed)" if drain.failed else ""
    return (
        f"| {number} | shipped ({unit}){failed} | {drain.concurrency} | {drain.items:,} "
        f"| {_fmt(drain.span_seconds, 1)} | {_fmt(drain.rate, 1)} | {_cpu(drain, 'workers')} "
        f"| {_cpu(drain, 'dovecot')} | {_cpu(drain, 'postgres')} | {_memory(drain)} |"
    )


def _sync_table(mail: MailResults) -> list[str]:
    lines = list(SHIPPED_HEADER)
    for number, drain in mail.sync:
        lines.append(_shipped_row(number, drain, "sync_mailbox"))
    for number, plain in mail.sync_plain:
        lines.append(
            f"| {number} | plain imaplib + COPY | {plain.loops} | {plain.messages:,} "
            f"| {plain.imap_seconds:.1f} + {plain.copy_seconds:.2f} | {_fmt(plain.rate, 1)} "
            "| | | | |"
        )
    return lines


def _send_table(mail: MailResults) -> list[str]:
    lines = list(SHIPPED_HEADER)
    for number, drain in mail.send:
        lines.append(_shipped_row(number, drain, "send_email"))
    for number, plain in mail.send_plain:
        run = plain.run
        lines.append(
            f"| {number} | plain smtplib, {plain.mode} | {run.loops} | {run.items:,} "
            f"| {run.seconds:.1f} | {_fmt(run.rate, 1)} | | | | |"
        )
    return lines


def _limit_sync(mail: MailResults) -> str:
    best = mail.plain_sync_best()
    if best is None:
        return "no plain run"
    return (
        f"plain imaplib with {best.loops} loop(s): {_fmt(best.rate, 1)} messages/s "
        f"({best.messages:,} messages: IMAP {best.imap_seconds:.1f} s + COPY "
        f"{best.copy_seconds:.2f} s)"
    )


def _limit_send(mail: MailResults, mode: str | None = None) -> str:
    best: PlainSend | None = mail.plain_send_best(mode)
    if best is None:
        return "no plain run"
    return f"plain smtplib, {best.mode}, {best.run.loops} loop(s): {_fmt(best.run.rate, 1)} mails/s"


def _cores() -> int:
    return os.cpu_count() or 1


def cpu_budget(mail: MailResults, what: str) -> CpuBudget | None:
    """CPU per item (message stored, mail sent) over the shipped rounds at the shipped
    concurrency, per measured part; None without such a round."""
    drains = [
        drain
        for _, drain in (mail.sync if what == "sync" else mail.send)
        if drain.concurrency == mail.shipped_concurrency and drain.items
    ]
    items = sum(drain.items for drain in drains)
    if not items:
        return None
    per_item = {
        part: sum(drain.cpu_seconds.get(part, math.nan) for drain in drains) * 1000 / items
        for part in CPU_PARTS
    }
    return CpuBudget(_cores(), per_item)


def _budget_line(mail: MailResults, what: str, limit: float, target: float) -> str:
    budget = cpu_budget(mail, what)
    if budget is None:
        return "CPU per item: no shipped round at the shipped concurrency."
    item, unit = ("message stored", "messages/s") if what == "sync" else ("mail", "mails/s")
    spent = ", ".join(
        f"{name} {_fmt(budget.per_item_ms[part], 2)}" for part, name in CPU_PARTS.items()
    )
    target_rate = target * limit
    return (
        f"CPU per {item} over the shipped rounds ({mail.shipped_concurrency} threads in all): "
        f"{spent} ms, {_fmt(budget.total_ms, 2)} together (the SMTP server, Redis and the "
        f"harness not counted). On this machine's {budget.cores} cores that allows at most "
        f"{_fmt(budget.rate_allowed(), 1)} {unit} (measured: "
        f"{_fmt(mail.shipped_rate(what), 1)}); Dovecot and PostgreSQL alone allow "
        f"{_fmt(budget.rate_allowed('dovecot', 'postgres'), 1)}. The target, {target} of the "
        f"limit ({_fmt(target_rate, 1)} {unit}), leaves every process together "
        f"{_fmt(budget.ms_allowed(target_rate), 2)} ms per {item}."
    )


def _idle_lines(mail: MailResults) -> list[str]:
    capacity = idle_capacity(mail)
    first, idle = mail.idle_first, mail.idle
    if capacity is None or idle is None or first is None:
        return ["Not measured in this run."]
    interval = mail.sync_interval
    worker_ms = idle.cpu_ms_per_task("workers")
    cores = _cores()
    worker_only = cores * interval * 1000 / worker_ms if worker_ms > 0 else math.nan
    how = (
        f"every one of the {capacity.mailboxes:,} mailboxes was synced "
        f"{_fmt(capacity.last_seconds, 1)} s after the fan-out began (within the {interval} s "
        f"interval): {_fmt(capacity.seconds_per_sync * 1000, 1)} ms of wall time per idle sync "
        f"at the shipped concurrency; {interval} s / that = {capacity.extrapolated:,} "
        f"(rounded down to hundreds), extrapolated linearly from the measured "
        f"{capacity.mailboxes:,}"
        if capacity.all_fit
        else f"{capacity.synced_within:,} of {capacity.mailboxes:,} mailboxes were synced within "
        f"the {interval} s interval (the rest expired or ended later): the claim is what fit"
    )
    return [
        "| fan-out | mailboxes queued | synced | last sync ended after, s | per s "
        "| worker CPU ms/sync | Dovecot CPU ms/sync | PostgreSQL CPU ms/sync | workers' peak MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {d.what} | {d.queued:,} | {d.items:,} | {_fmt(d.after_fanout_seconds, 1)} "
            f"| {_fmt(d.rate, 1)} | {_cpu(d, 'workers')} | {_cpu(d, 'dovecot')} "
            f"| {_cpu(d, 'postgres')} | {_memory(d)} |"
            for d in (first, idle)
        ),
        "",
        f"- Claimed: {capacity.claim:,} idle mailboxes per worker host: {how}.",
        f"- On this machine the worker host also runs Dovecot, PostgreSQL and Redis on its {cores} "
        f"cores. The workers alone spent {_fmt(worker_ms, 1)} ms of CPU per idle sync: a host "
        f"that only ran the workers would use its {cores} cores for about "
        f"{_fmt(worker_only)} idle syncs per {interval} s (CPU arithmetic, not measured).",
    ]


def section(mail: MailResults | None, plot_name: str) -> list[str]:
    if mail is None or mail.skipped:
        return []
    plan = mail.plan
    dovecot = _tool_version(["dovecot", "--version"])
    return [
        "### Real work: sync and send against their protocol's limit, idle mailboxes",
        "",
        f"- Servers, all on 127.0.0.1, started by the harness (tests/fixtures): Dovecot "
        f"{dovecot} (IMAP, STARTTLS), aiosmtpd {version('aiosmtpd')} (SMTP, STARTTLS, AUTH), "
        "PostgreSQL 15 (fsync off, as in the tests), redis-server.",
        f"- Shipped: {mail.summary}; the real tasks, the shipped command line and settings, "
        "accounts registered with `mailworker account add` (IMAP and SMTP with STARTTLS).",
        f"- Sync: {plan.sync_mailboxes:,} mailboxes with {plan.messages_per_mailbox} new "
        f"messages of about 4 KB each, queued by sync_all_accounts. Send: {plan.sends:,} mails "
        f"of about 4 KB from {plan.send_accounts} accounts to one remote recipient. "
        f"Rounds: {plan.rounds} at the shipped concurrency (median below), one at the others.",
        "- Times of the shipped runs: the task ledger's first start to last end "
        "(task_attempts); CPU: each process tree's user + system time over the run.",
        "",
        f"Sync: shipped {_fmt(mail.shipped_rate('sync'), 1)} messages/s; limit: "
        f"{_limit_sync(mail)}; ratio {_fmt(sync_ratio(mail), 2)}.",
        "",
        *_sync_table(mail),
        "",
        _budget_line(mail, "sync", _best_sync_rate(mail), SYNC_RATIO_TARGET),
        "",
        f"Send: shipped {_fmt(mail.shipped_rate('send'), 1)} mails/s; limit: {_limit_send(mail)}; "
        f"ratio {_fmt(send_ratio(mail), 2)}. Against a session per mail as `send_email` opens "
        f"({_limit_send(mail, 'session per mail')}): "
        f"{_fmt(send_ratio(mail, 'session per mail'), 2)}.",
        "",
        *_send_table(mail),
        "",
        _budget_line(mail, "send", _best_send_rate(mail), SEND_RATIO_TARGET),
        "",
        f"Idle mailboxes: {plan.idle_mailboxes:,} registered (the sync ones included), synced "
        "by one fan-out with the workers running, as beat sends it; the first fan-out makes each "
        "mailbox's first sync, the second is the measured one.",
        "",
        *_idle_lines(mail),
        "",
        f"![sync and send throughput against concurrency]({plot_name})",
        *(["", "Failed runs:", *(f"- {f}" for f in mail.failures)] if mail.failures else []),
    ]
