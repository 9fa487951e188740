"""`python -m bench` (what `make bench` runs): measure, then write docs/benchmarks.md and the plot.

Only loopback: a private redis-server on a free 127.0.0.1 port, worker processes on this machine
and, for deploy time, the project's own lab containers. Every phase is bounded in time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from bench.deploy import DeployFailed, DeployTiming, lab_available, measure_deploy
from bench.layout import memory_limit
from bench.machine import describe_machine, load_average
from bench.mail_phases import MailPlan, MailResults, run_mail_phases
from bench.mailstack import missing_servers
from bench.memory import MemoryCgroup
from bench.plot import plot_mail, plot_sweep
from bench.redis_server import running_redis
from bench.report import RunInfo, render, write_report
from bench.suite import Plan, Results, load_units, run_rounds, run_sweep

REPO = Path(__file__).resolve().parent.parent
FULL = Plan(
    rounds=3,
    noop_tasks=6000,
    io_tasks=2000,
    latency_seconds=6,
    noop_sweep=(1, 2, 4, 8),
    io_sweep=(2, 4, 8, 16, 32, 64),
    sweep_seconds=8,
    sweep_tasks=(5000, 3000),
)
QUICK = Plan(
    rounds=1,
    noop_tasks=2000,
    io_tasks=300,
    latency_seconds=2,
    noop_sweep=(2, 4),
    io_sweep=(4, 32),
    sweep_seconds=4,
    sweep_tasks=(1000, 300),
)


FULL_MAIL = MailPlan(
    rounds=2,
    sync_mailboxes=400,
    messages_per_mailbox=5,
    sends=800,
    send_accounts=50,
    idle_mailboxes=6000,
    threads_sweep=(2, 5, 10),
    plain_sweep=(1, 2, 8, 20, 40),
)
QUICK_MAIL = MailPlan(
    rounds=1,
    sync_mailboxes=40,
    messages_per_mailbox=5,
    sends=100,
    send_accounts=10,
    idle_mailboxes=200,
    threads_sweep=(),
    plain_sweep=(1, 8),
)


def _mail(skip: bool, plan: MailPlan) -> MailResults | None:
    if skip:
        return None
    missing = missing_servers()
    if missing:
        return MailResults(plan, skipped=missing)
    try:
        return run_mail_phases(plan, load_units())
    except Exception as failure:  # the servers did not start: the other figures still count
        first = str(failure).strip().splitlines()
        return MailResults(
            plan, skipped=f"the mail phases failed: {first[0] if first else failure!r}"
        )


def _cgroup_note() -> str:
    limit = memory_limit()
    probe = MemoryCgroup.create("celery-fleet-bench-probe", limit)
    if probe is None:
        mib = limit // 1024 // 1024
        return f"no memory cgroup could be made here: the {mib} MiB limit was NOT enforced"
    probe.remove()
    return (
        f"every session's workers ran in a memory cgroup (v{probe.version}) limited to "
        f"{limit // 1024 // 1024} MiB, like the units' MemoryMax"
    )


def _deploy(skip: bool, work_dir: Path) -> list[DeployTiming] | str:
    if skip:
        return "skipped with --skip-deploy"
    missing = lab_available()
    if missing:
        return missing
    try:
        return measure_deploy(work_dir)
    except DeployFailed as failure:
        return f"the lab deploy failed: {str(failure).splitlines()[0]}"


def _json_default(value: object) -> object:
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="one small round (develop the harness)"
    )
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3, quick 1)")
    parser.add_argument("--skip-sweep", action="store_true", help="no concurrency sweep, no plot")
    parser.add_argument("--skip-deploy", action="store_true", help="do not time site.yml")
    parser.add_argument("--skip-mail", action="store_true", help="no real sync and send work")
    parser.add_argument(
        "--skip-synthetic", action="store_true", help="no no-op and 50 ms rounds (develop)"
    )
    parser.add_argument(
        "--mail-plot", type=Path, default=REPO / "docs" / "benchmarks-mail-throughput.png"
    )
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "benchmarks-throughput.png")
    parser.add_argument("--json", type=Path, default=REPO / "build" / "bench" / "results.json")
    options = parser.parse_args(argv)

    plan = QUICK if options.quick else FULL
    if options.rounds:
        plan = dataclasses.replace(plan, rounds=options.rounds)
    started = datetime.now(UTC)
    load_before = load_average()
    results = Results(plan, load_units())
    if not options.skip_synthetic:
        with running_redis() as redis:
            run_rounds(redis, plan, results)
            if not options.skip_sweep:
                run_sweep(redis, plan, results)
    mail = _mail(options.skip_mail, QUICK_MAIL if options.quick else FULL_MAIL)
    with tempfile.TemporaryDirectory(prefix="celery-fleet-bench-") as tmp:
        deploy = _deploy(options.skip_deploy, Path(tmp))
    info = RunInfo(
        date=started.strftime("%Y-%m-%d %H:%M UTC"),
        command="make bench"
        if not argv and not sys.argv[1:]
        else "python -m bench " + " ".join(argv or sys.argv[1:]),
        machine=describe_machine(),
        load_before=load_before,
        load_after=load_average(),
        cgroup=_cgroup_note(),
    )
    if not options.skip_sweep and not options.skip_synthetic:
        plot_sweep(results.sweep, results.summaries, options.plot)
    if mail is not None and not mail.skipped:
        plot_mail(mail, options.mail_plot)
    section = render(
        info, results, deploy, options.plot.name, mail=mail, mail_plot_name=options.mail_plot.name
    )
    write_report(options.doc, section)
    options.json.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "info": dataclasses.asdict(info),
        "summaries": results.summaries,
        "sessions": [{"round": n, **dataclasses.asdict(s)} for n, s in results.sessions],
        "sweep": [dataclasses.asdict(p) for p in results.sweep],
        "deploy": deploy if isinstance(deploy, str) else [dataclasses.asdict(t) for t in deploy],
        "failures": results.failures,
        "mail": dataclasses.asdict(mail) if mail is not None else None,
    }
    options.json.write_text(json.dumps(payload, indent=1, default=_json_default))
    print(f"wrote {options.doc} and {options.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
