#!/usr/bin/env bash
# Prints, from a saved test log, the few lines that say what failed, so they are the last thing a
# CI log shows (Molecule prints its destroy step after the verifier's report).
#   scripts/failure-summary.sh LOG
set -euo pipefail
log=${1:?usage: failure-summary.sh LOG}
[[ -r $log ]] || { echo "failure-summary: cannot read $log" >&2; exit 2; }

strip_colour() { sed -E 's/\x1b\[[0-9;]*[A-Za-z]//g' "$log"; }

echo "==== what failed (full log: $log) ===="
{
  # pytest's short summary (-rfE): one line per failed test with the first line of its error.
  strip_colour | grep -E '^(FAILED|ERROR) ' || true
  # Ansible: the task that failed and its message.
  strip_colour | grep -E '^(fatal|failed): \[|^TASK \[|^msg: ' | grep -B1 -A1 -E '^(fatal|failed): \[' || true
  # Molecule's own verdict.
  strip_colour | grep -E '(ERROR|CRITICAL) +[A-Z]' | grep -v 'Pruning' || true
} | cut -c1-400 | awk '!seen[$0]++' | tail -n 15
