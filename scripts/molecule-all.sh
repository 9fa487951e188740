#!/usr/bin/env bash
# Run every Molecule scenario, JOBS at a time (each has its own containers, network and apt
# cache), longest first; each writes its own log, printed whole once it ends, so that a CI log
# reads one scenario after the other. A failed scenario's summary comes last.
#   scripts/molecule-all.sh JOBS LOG_DIR
set -uo pipefail
jobs=${1:?JOBS}
logs=${2:?LOG_DIR}
molecule=${MOLECULE:-molecule}
# Measured durations on 2 cores decide the order: the longest starts first.
order=(fleet default supervisor)

scenarios=()
for scenario in "${order[@]}"; do
  [[ -f molecule/$scenario/molecule.yml ]] && scenarios+=("$scenario")
done
for file in molecule/*/molecule.yml; do
  scenario=$(basename "$(dirname "$file")")
  [[ " ${scenarios[*]} " == *" $scenario "* ]] || scenarios+=("$scenario")
done

declare -A pid_of=() started_at=()
failed=()
# Print an ended scenario's log and verdict (its subshell wrote the exit status to a file: `wait -n`
# has already reaped it).
report() {
  local scenario=$1 status
  status=$(cat "$logs/molecule-$scenario.rc")
  cat "$logs/molecule-$scenario.log"
  echo "== scenario $scenario: $( ((status == 0)) && echo passed || echo FAILED) in $((SECONDS - started_at[$scenario])) s"
  ((status == 0)) || failed+=("$scenario")
  unset "pid_of[$scenario]"
}
# Wait for any running scenario to end and report it.
reap_one() {
  local done_pid running
  wait -n -p done_pid "${pid_of[@]}" || true
  for running in "${!pid_of[@]}"; do
    [[ ${pid_of[$running]} == "$done_pid" ]] && report "$running"
  done
}

rm -f "$logs"/molecule-*.rc
# Each scenario's prerun installs requirements.yml into one shared cache; started together on a
# clean clone they raced to create its directory (ansible-galaxy: "File exists"). One prerun
# first, alone, leaves the others nothing to create.
if ! "$molecule" dependency -s "${scenarios[0]}" > "$logs/molecule-dependency.log" 2>&1; then
  cat "$logs/molecule-dependency.log"
  echo "== molecule dependency failed (full log: $logs/molecule-dependency.log)"
  exit 1
fi
for scenario in "${scenarios[@]}"; do
  while ((${#pid_of[@]} >= jobs)); do reap_one; done
  echo "== scenario $scenario: started ($(date -u +%H:%M:%S))"
  started_at[$scenario]=$SECONDS
  (
    "$molecule" test -s "$scenario" > "$logs/molecule-$scenario.log" 2>&1
    echo $? > "$logs/molecule-$scenario.rc"
  ) &
  pid_of[$scenario]=$!
done
while ((${#pid_of[@]} > 0)); do reap_one; done

for scenario in "${failed[@]}"; do
  scripts/failure-summary.py "$logs/molecule-$scenario.log" "$logs/verify-$scenario.xml"
done
((${#failed[@]} == 0))
