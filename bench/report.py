"""docs/benchmarks.md: the generated results section between markers; the prose around it stays."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import mail_report
from bench.deploy import DeployTiming
from bench.layout import memory_limit
from bench.machine import Machine
from bench.mail_phases import MailResults
from bench.runner import Session
from bench.suite import ABLATION, GUARANTEES, IO, NOOP, Results

START = "<!-- bench:results:start -->"
END = "<!-- bench:results:end -->"
MIB = 1024 * 1024

# Targets from issue 5 (2-core machine).
NOOP_RATIO_TARGET = 2.0
IO_RATE_TARGET = 500.0
P99_TARGET_MS = 10.0
RSS_TARGET_MB = 60.0
RERUN_TARGET_S = 20.0
# Target from issue 12: shipped worker CPU per no-op task over Celery's with the same guarantees.
FRAMEWORK_CPU_TARGET = 0.5


@dataclass(frozen=True)
class RunInfo:
    date: str
    command: str
    machine: Machine
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    cgroup: str


def _fmt(value: float, digits: int = 0) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.{digits}f}"


def _ratio(shipped: float, default: float) -> float:
    if math.isnan(shipped) or math.isnan(default) or default == 0:
        return math.nan
    return shipped / default


def _verdict(value: float, ok: Callable[[float], bool]) -> str:
    if math.isnan(value):
        return "n/a"
    return "met" if ok(value) else "MISSED"


def _verdict_at_most(value: float, target: float) -> str:
    """ "met", or "MISSED", with how far from the target, for a lower-is-better figure."""
    if math.isnan(value) or target <= 0:
        return "n/a"
    margin = (value - target) / target
    if value <= target:
        return f"met, {margin:+.0%}"
    return f"MISSED by {margin:.0%}"


def _rss_mb(s: Session) -> float:
    return s.memory.max_process_rss / MIB if s.memory.per_process else math.nan


def _pss_mb(s: Session) -> float:
    return s.memory.max_process_pss / MIB if s.memory.pss_per_process else math.nan


def _pss_sum_mb(s: Session) -> float:
    return s.memory.pss_sum_peak / MIB if s.memory.pss_per_process else math.nan


def _cgroup_mb(s: Session) -> float:
    return s.memory.cgroup_peak / MIB if s.memory.cgroup_peak else math.nan


ROWS: list[tuple[str, Callable[[Session], float], int, bool]] = [
    # (figure, value, digits, higher is better)
    ("drain throughput, tasks/s", lambda s: s.drain_rate, 0, True),
    ("enqueue throughput (producer), tasks/s", lambda s: s.enqueue_rate, 0, True),
    ("worker CPU per task, ms (all worker processes)", lambda s: s.worker_cpu_ms, 2, False),
    ("redis-server CPU per task, ms", lambda s: s.redis_cpu_ms, 3, False),
    ("Redis commands per task (worker side)", lambda s: s.redis_commands, 1, False),
    ("p50 enqueue->start at half of own peak, ms", lambda s: s.latency_p50_ms, 1, False),
    ("p99 enqueue->start at half of own peak, ms", lambda s: s.latency_p99_ms, 1, False),
    ("offered load for those latencies, tasks/s", lambda s: s.latency_rate, 0, True),
    ("peak RSS of the largest worker process, MiB", _rss_mb, 1, False),
    ("peak PSS of the largest worker process (sampled), MiB", _pss_mb, 1, False),
    ("peak PSS of all worker processes together (sampled), MiB", _pss_sum_mb, 1, False),
    ("peak memory of all worker processes (cgroup), MiB", _cgroup_mb, 1, False),
    ("start until consuming, s", lambda s: s.ready_seconds, 1, False),
]


def _table(results: Results) -> list[str]:
    lines = [
        "| figure | workload | Celery defaults | same guarantees | shipped | shipped/default "
        "| shipped/same guarantees |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for workload in (NOOP.name, IO.name):
        for name, value, digits, _ in ROWS:
            default = results.median(workload, "default", value)
            same = results.median(workload, GUARANTEES, value)
            shipped = results.median(workload, "shipped", value)
            lines.append(
                f"| {name} | {workload} | {_fmt(default, digits)} | {_fmt(same, digits)} "
                f"| {_fmt(shipped, digits)} | {_fmt(_ratio(shipped, default), 2)} "
                f"| {_fmt(_ratio(shipped, same), 2)} |"
            )
        common99 = results.median(workload, "shipped", lambda s: s.common_p99_ms)
        common_rate = results.median(workload, "shipped", lambda s: s.common_rate)
        default99 = results.median(workload, "default", lambda s: s.latency_p99_ms)
        lines.append(
            f"| p99 enqueue->start at the default's half peak ({_fmt(common_rate)}/s), ms "
            f"| {workload} | {_fmt(default99, 1)} | | {_fmt(common99, 1)} "
            f"| {_fmt(_ratio(common99, default99), 2)} | |"
        )
    return lines


def _configurations(results: Results) -> list[str]:
    """What each configuration ran as (none when the synthetic phases were skipped)."""
    described = {
        "default": "Celery defaults",
        GUARANTEES: "Same guarantees (Celery by hand, bench/guarantees_app.py)",
        "shipped": "Shipped",
    }
    return [
        f"- {label}: {results.summaries[name]}."
        for name, label in described.items()
        if results.summaries.get(name)
    ]


def _summary(results: Results, deploy: list[DeployTiming] | str) -> list[str]:
    noop_ratio = _ratio(
        results.median(NOOP.name, "shipped", lambda s: s.drain_rate),
        results.median(NOOP.name, "default", lambda s: s.drain_rate),
    )
    io_rate = results.median(IO.name, "shipped", lambda s: s.drain_rate)
    io_ratio = _ratio(io_rate, results.median(IO.name, "default", lambda s: s.drain_rate))
    p99 = {
        w: results.median(w, "shipped", lambda s: s.latency_p99_ms) for w in (NOOP.name, IO.name)
    }
    worst_p99 = max(p99.values())
    rss = max(results.median(w, "shipped", _rss_mb) for w in (NOOP.name, IO.name))
    default_rss = max(results.median(w, "default", _rss_mb) for w in (NOOP.name, IO.name))
    pss = max(results.median(w, "shipped", _pss_mb) for w in (NOOP.name, IO.name))
    pss_sum = max(results.median(w, "shipped", _pss_sum_mb) for w in (NOOP.name, IO.name))
    noop_verdict = _verdict(noop_ratio, lambda v: v >= NOOP_RATIO_TARGET)
    io_verdict = _verdict(io_rate, lambda v: v >= IO_RATE_TARGET)
    p99_verdict = _verdict(worst_p99, lambda v: v < P99_TARGET_MS)
    rss_verdict = _verdict(rss, lambda v: v <= RSS_TARGET_MB)
    lines = [
        f"- no-op throughput ratio (shipped/default): {_fmt(noop_ratio, 2)} "
        f"(target >= {NOOP_RATIO_TARGET:.0f}: {noop_verdict})",
        f"- 50 ms I/O throughput, shipped, one node, {memory_limit() // MIB} MiB limit: "
        f"{_fmt(io_rate)} tasks/s, ratio {_fmt(io_ratio, 2)} "
        f"(target >= {IO_RATE_TARGET:.0f}/s: {io_verdict})",
        f"- p99 enqueue->start at half of peak, shipped: no-op {_fmt(p99[NOOP.name], 1)} ms, "
        f"I/O {_fmt(p99[IO.name], 1)} ms (target < {P99_TARGET_MS:.0f} ms: {p99_verdict})",
        f"- largest worker process peak RSS, shipped: {_fmt(rss, 1)} MiB (Celery defaults: "
        f"{_fmt(default_rss, 1)} MiB) (target <= {RSS_TARGET_MB:.0f} MiB: {rss_verdict})",
        f"- worker processes' peak PSS, shipped: largest {_fmt(pss, 1)} MiB, all together "
        f"{_fmt(pss_sum, 1)} MiB, against the units' {memory_limit() // MIB} MiB MemoryMax",
    ]
    framework = _ratio(
        results.median(NOOP.name, "shipped", lambda s: s.worker_cpu_ms),
        results.median(NOOP.name, GUARANTEES, lambda s: s.worker_cpu_ms),
    )
    lines.append(
        f"- framework CPU per task (shipped/same-guarantees): {_fmt(framework, 2)} "
        f"(target <= {FRAMEWORK_CPU_TARGET}: {_verdict_at_most(framework, FRAMEWORK_CPU_TARGET)})"
    )
    ablation = _ratio(
        results.median(NOOP.name, ABLATION, lambda s: s.drain_rate),
        results.median(NOOP.name, "default", lambda s: s.drain_rate),
    )
    if not math.isnan(ablation):
        lines.append(
            f"- ablation, not shipped: no-op throughput ratio with task events off "
            f"(MAILWORKER_TASK_EVENTS=false): {_fmt(ablation, 2)}"
        )
    # A figure that was not measured gets no summary line (the deploy section says why).
    if not isinstance(deploy, str):
        fast = deploy[-1]
        lines.append(
            f"- idempotent site.yml re-run ({fast.hosts} lab host(s), {fast.variant}): "
            f"{fast.rerun_seconds:.1f} s, {fast.rerun_changed} changed "
            f"(target <= {RERUN_TARGET_S:.0f} s: "
            f"{_verdict(fast.rerun_seconds, lambda v: v <= RERUN_TARGET_S)})"
        )
    return lines


def _command_mix(results: Results) -> list[str]:
    lines = []
    for workload in (NOOP.name, IO.name):
        for label in ("default", GUARANTEES, "shipped"):
            sessions = results.of(workload, label)
            if sessions:
                last = sessions[-1]
                lines.append(
                    f"- {workload}, {label}: {_fmt(last.redis_commands, 1)} per task "
                    f"({last.command_mix})"
                )
    return lines


def _sweep_table(results: Results) -> list[str]:
    lines = [
        "| workload | configuration | concurrency | tasks/s | note |",
        "|---|---|---:|---:|---|",
    ]
    for p in results.sweep:
        lines.append(f"| {p.workload} | {p.label} | {p.concurrency} | {_fmt(p.rate)} | {p.note} |")
    return lines


def _sessions_table(results: Results) -> list[str]:
    lines = [
        "| round | workload | configuration | tasks/s | CPU ms/task | p50 ms | p99 ms "
        "| at tasks/s | max RSS MiB |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for number, s in results.sessions:
        cells = [
            str(number),
            s.workload,
            s.deployment,
            _fmt(s.drain_rate),
            _fmt(s.worker_cpu_ms, 2),
            _fmt(s.latency_p50_ms, 1),
            _fmt(s.latency_p99_ms, 1),
            _fmt(s.latency_rate),
            _fmt(_rss_mb(s), 1),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _deploy_table(deploy: list[DeployTiming] | str) -> list[str]:
    if isinstance(deploy, str):
        return [f"Not measured in this run: {deploy}."]
    lines = [
        "| ansible settings | full converge, s | idempotent re-run, s | changed on re-run |",
        "|---|---:|---:|---:|",
    ]
    for t in deploy:
        lines.append(
            f"| {t.variant} | {t.converge_seconds:.1f} | {t.rerun_seconds:.1f} "
            f"| {t.rerun_changed} |"
        )
    for t in deploy:
        if t.slowest:
            tasks = "; ".join(f"{name} {seconds:.1f} s" for name, seconds in t.slowest)
            lines += ["", f"Slowest tasks of the re-run, {t.variant}: {tasks}."]
    return lines


def render(
    info: RunInfo,
    results: Results,
    deploy: list[DeployTiming] | str,
    plot_name: str,
    *,
    mail: MailResults | None = None,
    mail_plot_name: str = "",
) -> str:
    plan = results.plan
    lines = [
        START,
        "## Results (generated by `make bench`; do not edit by hand)",
        "",
        f"- Date: {info.date}. Command: `{info.command}`.",
        f"- Machine: {info.machine.describe()}.",
        f"- Load average (1, 5, 15 min) before: {' '.join(f'{v:.2f}' for v in info.load_before)}; "
        f"after: {' '.join(f'{v:.2f}' for v in info.load_after)}.",
        f"- Rounds: {plan.rounds}, each running the configurations back to back (medians below). "
        f"Tasks per session: {plan.noop_tasks} no-op, {plan.io_tasks} I/O; the latency phases "
        f"run {plan.latency_seconds:.0f} s (at least 100 tasks).",
        f"- Memory: {info.cgroup}.",
        *_configurations(results),
        "",
        "### Summary",
        "",
        *_summary(results, deploy),
        *mail_report.summary_lines(mail),
        "",
        "### Figures (medians of the rounds)",
        "",
        *_table(results),
        "",
        "### Redis commands per task (last round: the drain, worker start-up in, producer out)",
        "",
        *_command_mix(results),
        "",
        "### Throughput against concurrency",
        "",
        f"![throughput against concurrency]({plot_name})",
        "",
        *_sweep_table(results),
        "",
        *mail_report.section(mail, mail_plot_name),
        "",
        "### Deploy time",
        "",
        *_deploy_table(deploy),
        "",
        "### Every session",
        "",
        *_sessions_table(results),
    ]
    if results.failures:
        lines += ["", "### Failed sessions", "", *(f"- {f}" for f in results.failures)]
    lines += ["", END]
    return "\n".join(lines) + "\n"


def write_report(path: Path, section: str) -> None:
    """Replace the generated section of `path`, keeping the hand-written text around it."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if START in text and END in text:
        before, rest = text.split(START, 1)
        after = rest.split(END, 1)[1].lstrip("\n")
        text = before + section + ("\n" + after if after else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
