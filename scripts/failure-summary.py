#!/usr/bin/env python3
"""Print the few lines that say what failed in a Molecule run, so that they are the last thing a CI
log shows (Molecule prints its cleanup and destroy steps after the verifier's report).

    scripts/failure-summary.py LOG [JUNIT_XML]

From the verifier's JUnit XML: each failed check with the first lines of its error. From the log:
the Ansible task that failed and Molecule's verdict.
"""

from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
BOX = re.compile(r"^\s*[│└─┌]+\s?")
MAX_LINES = 18
WIDTH = 300


def failed_checks(junit: Path) -> list[str]:
    lines = []
    # The XML is pytest's own, written by this run on this machine.
    for case in ET.parse(junit).getroot().iter("testcase"):  # noqa: S314
        for problem in [*case.iter("failure"), *case.iter("error")]:
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            message = (problem.get("message") or "").strip().splitlines()[:1]
            # pytest's report: the `E   assert ...` line says what was compared.
            asserted = [
                line[1:].strip()
                for line in (problem.text or "").splitlines()
                if re.match(r"E\s+assert ", line)
            ][:1]
            lines.append(f"FAILED {name}")
            lines += [f"    {line.strip()}" for line in message + asserted]
    return lines


def failed_tasks(log: Path) -> list[str]:
    raw = log.read_text(errors="replace").splitlines()
    text = [BOX.sub("", ANSI.sub("", line)) for line in raw]
    lines, task = [], ""
    for line in text:
        if line.startswith("TASK ["):
            task = line.rstrip(" *")
        elif re.match(r"(fatal|failed): \[", line):
            lines += [task, line]
        elif re.match(r"(CRITICAL|ERROR) ", line):
            lines.append(line)
    return list(dict.fromkeys(lines))


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    log, *rest = (Path(arg) for arg in argv[1:])
    junit = rest[0] if rest else None
    lines = failed_checks(junit) if junit and junit.is_file() else []
    lines += failed_tasks(log) if log.is_file() else [f"(no log at {log})"]
    print(f"==== what failed (full log: {log}) ====")
    for line in lines[-MAX_LINES:]:
        print(line[:WIDTH])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
