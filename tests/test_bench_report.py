"""The synthetic summary lines of docs/benchmarks.md (bench/report.py), worded exactly as issue 12
asks so a script can read them; built from made-up sessions, nothing timed."""

from __future__ import annotations

import math
import re

from bench.layout import memory_limit
from bench.report import MIB, _configurations, _summary, _table, _verdict_at_most
from bench.runner import Session
from bench.suite import GUARANTEES, IO, LABELS, NOOP, Plan, Results
from bench.worker_proc import MemorySample

PLAN = Plan(1, 10, 10, 1.0, (), (), 1.0, (1, 1))
FRAMEWORK = re.compile(
    r"^- framework CPU per task \(shipped/same-guarantees\): (?P<value>\d+\.\d\d|n/a) "
    r"\(target <= 0\.5: (?P<verdict>met, [-+]\d+%|MISSED by \d+%|n/a)\)$"
)


def _session(label: str, workload: str, cpu_ms: float) -> Session:
    return Session(label, workload, 2, 10, drain_rate=100.0, worker_cpu_ms=cpu_ms)


def _results(cpu_ms: dict[str, list[float]]) -> Results:
    results = Results(PLAN, [])
    for label, values in cpu_ms.items():
        for number, value in enumerate(values, start=1):
            results.sessions.append((number, _session(label, NOOP.name, value)))
            results.sessions.append((number, _session(label, IO.name, value * 10)))
    return results


def _framework_line(results: Results) -> re.Match[str]:
    lines = [line for line in _summary(results, "skipped") if "framework CPU" in line]
    assert len(lines) == 1, lines
    match = FRAMEWORK.match(lines[0])
    assert match, lines[0]
    return match


def test_the_same_guarantees_run_between_default_and_shipped_in_every_round() -> None:
    assert LABELS == ("default", GUARANTEES, "shipped")


def test_framework_line_met_is_the_median_no_op_cpu_ratio() -> None:
    # Medians: shipped 1.2 ms, same guarantees 3.0 ms (the I/O figures, ten times larger, and
    # the defaults' must not count).
    match = _framework_line(
        _results({"default": [0.1], "shipped": [1.2, 1.0, 9.0], GUARANTEES: [3.0, 2.0, 3.5]})
    )
    assert match["value"] == "0.40"
    assert match["verdict"] == "met, -20%"


def test_framework_line_missed_says_by_how_much() -> None:
    match = _framework_line(_results({"shipped": [2.7], GUARANTEES: [3.0]}))
    assert match["value"] == "0.90"
    assert match["verdict"] == "MISSED by 80%"


def test_framework_line_without_the_same_guarantees_run_is_not_a_verdict() -> None:
    match = _framework_line(_results({"shipped": [2.7]}))
    assert match["value"] == "n/a"
    assert match["verdict"] == "n/a"


def test_the_other_summary_lines_keep_their_wording() -> None:
    lines = _summary(_results({"default": [1.0], "shipped": [2.0], GUARANTEES: [3.0]}), "skipped")
    prefixes = [
        "- no-op throughput ratio (shipped/default): ",
        "- 50 ms I/O throughput, shipped, one node, ",
        "- p99 enqueue->start at half of peak, shipped: ",
        "- largest worker process peak RSS, shipped: ",
        "- worker processes' peak PSS, shipped: ",
        "- framework CPU per task (shipped/same-guarantees): ",
    ]
    assert len(lines) >= len(prefixes)
    assert [line[: len(p)] for line, p in zip(lines, prefixes, strict=False)] == prefixes


def test_pss_line_takes_the_median_of_the_shipped_sessions_peaks() -> None:
    results = Results(PLAN, [])
    for number, (largest, together) in enumerate([(40, 90), (50, 100), (45, 300)], start=1):
        for workload in (NOOP.name, IO.name):
            session = _session("shipped", workload, 1.0)
            session.memory = MemorySample(
                pss_per_process={1: ("celery", largest * MIB), 2: ("celery", MIB)},
                pss_sum_peak=together * MIB,
            )
            results.sessions.append((number, session))
    lines = [line for line in _summary(results, "skipped") if "peak PSS" in line]
    assert lines == [
        "- worker processes' peak PSS, shipped: largest 45.0 MiB, all together 100.0 MiB, "
        f"against the units' {memory_limit() // MIB} MiB MemoryMax"
    ]


def test_verdict_at_most_is_lower_is_better() -> None:
    assert _verdict_at_most(0.5, 0.5) == "met, +0%"
    assert _verdict_at_most(0.25, 0.5) == "met, -50%"
    assert _verdict_at_most(0.6, 0.5) == "MISSED by 20%"
    assert _verdict_at_most(math.nan, 0.5) == "n/a"


def test_figures_table_has_the_same_guarantees_column_and_ratio() -> None:
    table = _table(_results({"default": [1.0], "shipped": [2.0], GUARANTEES: [4.0]}))
    assert table[0].split("|")[3:8] == [
        " Celery defaults ",
        " same guarantees ",
        " shipped ",
        " shipped/default ",
        " shipped/same guarantees ",
    ]
    cpu = next(r for r in table if r.startswith("| worker CPU per task") and "| no-op |" in r)
    assert [cell.strip() for cell in cpu.split("|")[3:8]] == [
        "1.00",
        "4.00",
        "2.00",
        "2.00",
        "0.50",
    ]
    assert all(row.count("|") == table[0].count("|") for row in table)


def test_configuration_lines_only_for_configurations_that_ran() -> None:
    results = _results({})
    assert _configurations(results) == []
    results.summaries["shipped"] = "threads, 2 x 20"
    assert _configurations(results) == ["- Shipped: threads, 2 x 20."]
