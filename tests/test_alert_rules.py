"""The alert rules roles/prometheus ships: valid for Debian's promtool, each with a promtool unit
test (tests/alert_rules/) that shows it firing and not firing, and a runbook in the operations
guide. About 2 s."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "roles" / "prometheus" / "files" / "mailworker-alerts.yml"
TESTS = sorted((REPO / "tests" / "alert_rules").glob("*.yml"))
OPERATIONS = REPO / "docs" / "operations.md"


def promtool() -> str:
    found = shutil.which("promtool")
    assert found, "promtool missing: `scripts/host-packages.sh test` installs Debian's prometheus"
    return found


def alerts() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_promtool_accepts_the_rules():
    completed = subprocess.run(
        [promtool(), "check", "rules", str(RULES)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in completed.stdout


@pytest.mark.parametrize("test_file", TESTS, ids=[path.stem for path in TESTS])
def test_promtool_unit_test(test_file: Path):
    completed = subprocess.run(
        [promtool(), "test", "rules", test_file.name],
        cwd=test_file.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "SUCCESS" in completed.stdout


def test_every_rule_is_tested_firing_and_not_firing():
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alerts()}
    assert names - firing == set(), "rules never shown firing"
    assert names - quiet == set(), "rules never shown quiet"


def anchor(heading: str) -> str:
    """GitHub's anchor for a markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_every_rule_links_its_runbook_section():
    headings = {
        anchor(line.lstrip("#"))
        for line in OPERATIONS.read_text().splitlines()
        if line.startswith("#")
    }
    for rule in alerts():
        url = rule["annotations"]["runbook_url"]
        page, _, fragment = url.partition("#")
        assert page == "docs/operations.md", rule["alert"]
        assert fragment == rule["alert"].lower(), rule["alert"]
        assert fragment in headings, f"docs/operations.md has no section for {rule['alert']}"
