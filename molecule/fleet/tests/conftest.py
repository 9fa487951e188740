"""Shared helpers for the fleet scenario: the hosts, load under a fault, and its counts.

The checks run on the controller. They reach the hosts through testinfra (Ansible's docker
connection) and inject faults with the Docker CLI (the containers are the hosts). Load comes from
scripts/fleet_loadgen.py, run with the deployed virtualenv on the first worker host: `submit` runs
in the background while a fault happens, `count` waits for every accepted task and prints the
counts, which the test prints too (`molecule verify` shows them with -s).
A test marked `@pytest.mark.units("celery-worker", ...)` prints those units' journal on every app
host when it fails.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import testinfra
import testinfra.utils.ansible_runner
from mailworker.settings import SETTINGS

ROOT = Path(__file__).resolve().parents[3]
INVENTORY = os.environ["MOLECULE_INVENTORY_FILE"]
_inventory = testinfra.utils.ansible_runner.AnsibleRunner(INVENTORY)
DATA = _inventory.get_hosts("postgresql")[0]
APP_HOSTS = _inventory.get_hosts("celery_workers")
WORKER_A, WORKER_B = APP_HOSTS[0], APP_HOSTS[1]
# The worker units of each application host (the unit model's defaults): each consumes through
# one main process, so each can hold one delivery in a pending BRPOP (docs/reliability.md).
WORKER_UNITS = ("celery-worker.service", "celery-worker@io.service")
SENTINEL_HOSTS = _inventory.get_hosts("redis_sentinel")
REDIS_HOSTS = _inventory.get_hosts("redis")
VENV_PYTHON = "/opt/mailworker/venv/bin/python"
LOADGEN = "/root/fleet_loadgen.py"
ENV_FILE = "/etc/mailworker/mailworker.env"
SINK_MAILDIR = "/srv/testmail/mail/alice@example.test"
TEST_PASSWORD = "lab-only-imap"  # the TEST-ONLY mail user of prepare.yml
PLAYBOOK_TIMEOUT = 900
JOURNAL_LINES = 40
# Which beat holds the lease, read as the app reads it (the settings file: through the Sentinels).
LEASE_HOLDER = (
    "import os, pathlib;"
    "from mailworker.ops.envfile import load_env_file;"
    "load_env_file(pathlib.Path('/etc/mailworker/mailworker.env'), os.environ, override=True);"
    "from mailworker.settings import load_settings;"
    "from mailworker.redis_client import redis_from_url;"
    "from mailworker.beat import LEASE_KEY, lease_holder;"
    "s = load_settings();"
    "print(lease_holder(redis_from_url(s.broker_url, s).get(LEASE_KEY)) or '')"
)
# beat.log's lines (the units log to /var/log/mailworker, in UTC, as the containers run).
SENT = re.compile(
    r"^\[([0-9-]+ [0-9:]+),(\d+): INFO/MainProcess\] Scheduler: Sending due task (\S+) "
)
CLAIMED = re.compile(r"INFO/MainProcess\] beat \S+ claimed the run of (\S+) at ([0-9.]+)$")


def host(name: str) -> Any:
    return testinfra.get_host(f"ansible://{name}", ansible_inventory=INVENTORY)


def docker(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"docker {' '.join(args)}: {done.stderr.strip()}"
    return done


def pause(name: str, tries: int = 5) -> None:
    """`docker pause`, tried again: cgroup v1's freezer gives up ("unable to freeze") when
    processes fork while it freezes them (runc#2791), as the host's health checks do."""
    for _ in range(tries - 1):
        done = subprocess.run(
            ["docker", "pause", name], capture_output=True, text=True, timeout=60, check=False
        )
        if done.returncode == 0:
            return
        print(f"\ndocker pause {name}: {done.stderr.strip()}; trying again", flush=True)
        time.sleep(1)
    docker("pause", name)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "units(*names): print these units' journal on failure")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    marker = item.get_closest_marker("units")
    if report.when != "call" or not report.failed or marker is None:
        return
    for name in APP_HOSTS:
        for unit in marker.args:
            journal = host(name).run(
                f"journalctl -u {shlex.quote(unit)} -n {JOURNAL_LINES} --no-pager"
            )
            report.sections.append((f"{name}: journalctl -u {unit}", journal.stdout))
        # The units' own output goes to /var/log/mailworker (worker.log, worker-io.log, beat.log).
        logs = host(name).run(f"tail -n {JOURNAL_LINES} /var/log/mailworker/*.log")
        report.sections.append((f"{name}: /var/log/mailworker", logs.stdout))


def settings_of(name: str = WORKER_A) -> dict[str, str]:
    """The deployed settings file of a worker host (what `count` and the delays rely on)."""
    text = host(name).file(ENV_FILE).content_string
    return dict(re.findall(r'^(MAILWORKER_[A-Z0-9_]+)="?([^"\n]*)"?$', text, re.MULTILINE))


def setting(name: str) -> int:
    """A deployed setting, else the app's own default from its settings table (the settings file
    lists only what the inventory sets; a default copied here would go stale)."""
    key = f"MAILWORKER_{name}"
    default = SETTINGS[key].default
    assert default is not None, f"{key} has no default"
    return int(settings_of().get(key, default))


def redelivery_delay() -> int:
    """The promised delay before a dead worker's tasks run again: the visibility timeout, then at
    most one restore sweep."""
    return setting("VISIBILITY_TIMEOUT") + setting("BROKER_RESTORE_INTERVAL")


@dataclass(frozen=True)
class Account:
    tenant_id: str
    user_id: str
    account_id: str

    def args(self) -> list[str]:
        return [self.tenant_id, self.user_id, self.account_id]


def new_account() -> Account:
    """A fresh tenant with one mailbox on the data host's test IMAP/SMTP servers."""
    tenant = f"fleet-{uuid.uuid4().hex[:8]}"
    command = " ".join(
        shlex.quote(arg)
        for arg in (
            *("mailworker", "account", "add", "--tenant", tenant, "--user", "alice@example.test"),
            *("--imap-host", DATA, "--imap-port", "1143", "--imap-security", "plain"),
            *("--smtp-host", DATA, "--smtp-port", "2525", "--smtp-security", "plain"),
            "--password-stdin",
        )
    )
    result = host(WORKER_A).run(f"printf '%s\\n' {TEST_PASSWORD} | {command}")
    assert result.rc == 0, result.stderr
    ids = dict(line.split("=", 1) for line in result.stdout.split())
    return Account(ids["tenant_id"], ids["user_id"], ids["account_id"])


@pytest.fixture(scope="session", autouse=True)
def loadgen_installed() -> None:
    docker("cp", str(ROOT / "scripts" / "fleet_loadgen.py"), f"{WORKER_A}:{LOADGEN}")


class Load:
    """One run of the load generator: `submit` in the background, then `count`."""

    def __init__(self, tag: str, rate: float, count: int, seconds: float) -> None:
        self.tag = tag
        # The sink's mailbox starts empty: every run's account syncs only the run's own mail (the
        # previous run has been counted).
        host(DATA).run(f"find {SINK_MAILDIR}/cur {SINK_MAILDIR}/new -type f -delete")
        self.account = new_account()
        run = f"/root/fleet-run-{tag}-{uuid.uuid4().hex[:6]}"
        self.run_file = f"{run}.json"
        self.stop_file = f"{run}.stop"
        self.pid_file = f"{run}.pid"  # fleet_loadgen.py writes it
        self._submitted: dict[str, Any] | None = None
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [
                *("docker", "exec", WORKER_A, VENV_PYTHON, LOADGEN, "submit"),
                *("--account", *self.account.args()),
                *("--rate", str(rate), "--count", str(count), "--seconds", str(seconds)),
                *("--tag", tag, "--out", self.run_file, "--stop-file", self.stop_file),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # Submitting from now on: a fault a test injects next meets the load (the producer's
        # imports alone took over 5 s on a busy machine, and PostgreSQL's outage missed it).
        ready = host(WORKER_A).run(
            f"timeout 120 sh -c 'until test -e {self.pid_file}; do sleep 0.2; done'"
        )
        assert ready.rc == 0, f"loadgen submit [{tag}] did not start within 120 s"

    def stop(self) -> None:
        """Stop submitting now (before --count or --seconds)."""
        host(WORKER_A).run(f"touch {self.stop_file}")

    def submitted(self, timeout: float = 300) -> dict[str, Any]:
        """Wait for `submit` to finish; what it submitted. A producer still running after TIMEOUT
        seconds dumps its threads' stacks (SIGUSR1), is stopped, and the test fails with them."""
        if self._submitted is not None:
            return self._submitted
        try:
            out, err = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            pid = f"$(cat {self.pid_file})"
            host(WORKER_A).run(f"kill -USR1 {pid}; sleep 2; kill -TERM {pid}")
            try:
                out, err = self.process.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                out, err = self.process.communicate()
            print(f"\nloadgen submit [{self.tag}] overran {timeout} s; its stacks:\n{err}")
            pytest.fail(f"loadgen submit [{self.tag}] still ran {timeout} s after it was awaited")
        assert self.process.returncode == 0, f"loadgen submit failed:\n{out}\n{err}"
        self._submitted = json.loads(out)
        return self._submitted

    def counts(self, wait: float) -> dict[str, Any]:
        """Wait for the tasks (at most `wait` s), count their effects and print the counts."""
        self.submitted()
        result = subprocess.run(
            [
                *("docker", "exec", "-e", f"LOADGEN_IMAP_PASSWORD={TEST_PASSWORD}", WORKER_A),
                *(VENV_PYTHON, LOADGEN, "count", self.run_file),
                *("--wait", str(wait), "--imap-host", DATA),
            ],
            capture_output=True,
            text=True,
            timeout=wait + 180,
            check=False,
        )
        assert result.stdout.strip(), f"loadgen count printed nothing:\n{result.stderr}"
        counts = json.loads(result.stdout)
        counts["phase_seconds"] = round(time.monotonic() - self.started, 1)
        shown = {key: value for key, value in counts.items() if key != "timeline"}
        print(f"\nfleet counts [{self.tag}]: {json.dumps(shown, sort_keys=True)}", flush=True)
        sys.stdout.flush()
        return counts


def assert_exactly_once(
    counts: dict[str, Any], *, killed: bool = False, lost_syncs: int = 0
) -> None:
    """Every task's effect once. `unknown` sends (delivered once, or counted lost) are allowed only
    where the test KILLED a worker process: only a kill between a send's final "." and its
    record of the reply leaves one (fleet_loadgen.py). LOST_SYNCS: the sync tasks the test
    accepts as lost (their work redone by a later sync). Each failure names what went wrong
    first (CI keeps only the start of the message), then the counts."""
    shown = {key: value for key, value in counts.items() if key != "timeline"}
    facts = f"\ncounts: {json.dumps(shown, sort_keys=True)}"
    statuses = counts["send_status"]
    assert counts["submitted_sends"] > 0, f"no send was submitted{facts}"
    if not killed:
        unknown = statuses.get("unknown", 0)
        assert unknown == 0, f"{unknown} send(s) ended `unknown` though no worker was killed{facts}"
    assert counts["lost"] == lost_syncs, (
        f"{counts['lost']} task(s) lost, {lost_syncs} allowed: send statuses {statuses},"
        f" {counts['not_delivered']} send(s) not delivered, sync states {counts['sync_states']},"
        f" lost ones accepted at {counts['lost_accepted_at']}{facts}"
    )
    assert counts["doubled"] == 0, (
        f"{counts['delivered_twice_or_more']} message(s) delivered twice or more,"
        f" {counts['rows_duplicated']} stored twice or more{facts}"
    )
    assert counts["ok"], (
        f"after the final sync ({counts['final_sync']}, {counts['final_sync_not_run']} not run"
        f" first) {counts['rows_missing']} message(s) are not stored"
        f" ({counts['rows_once']} once){facts}"
    )


def wait_for(condition: Callable[[], Any], timeout: float, step: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result or time.monotonic() >= deadline:
            return result
        time.sleep(step)


def playbook(name: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """`ansible-playbook playbooks/NAME` from the controller against this scenario's instance."""
    command = [
        str(Path(sys.executable).parent / "ansible-playbook"),
        *("-i", INVENTORY, *extra, str(ROOT / "playbooks" / name)),
    ]
    env = {
        **os.environ,
        "ANSIBLE_ROLES_PATH": str(ROOT / "roles"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
    }
    return subprocess.run(
        command, capture_output=True, text=True, timeout=PLAYBOOK_TIMEOUT, env=env, check=False
    )


def workers_answer(name: str) -> bool:
    """Every worker unit of the host answers `mailworker health worker`."""
    return host(name).run("mailworker health worker").rc == 0


def leader() -> str:
    """The node name of the beat that holds the lease ('' when none does)."""
    out = host(WORKER_A).check_output(f'{VENV_PYTHON} -c "{LEASE_HOLDER}"')
    return out.strip()


def beat_sends(name: str, since: float) -> list[tuple[float, str]]:
    """(time, entry) of every run beat on host NAME sent since the epoch time SINCE."""
    log = host(name).run("grep -h 'Sending due task' /var/log/mailworker/beat.log").stdout
    sends = []
    for found in map(SENT.match, log.splitlines()):
        if found:
            stamp = datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
            at = stamp.timestamp() + int(found.group(2)) / 1000
            if at >= since:
                sends.append((at, found.group(3)))
    return sends


def beat_claims(name: str, since: float) -> list[tuple[float, str]]:
    """(claimed time, entry) of every run beat on host NAME claimed since the epoch time SINCE."""
    log = host(name).run("grep -h ' claimed the run of ' /var/log/mailworker/beat.log").stdout
    claims = []
    for found in map(CLAIMED.search, log.splitlines()):
        if found and float(found.group(2)) >= since:
            claims.append((float(found.group(2)), found.group(1)))
    return claims


def unit_runs(name: str, unit: str) -> tuple[str, str]:
    """(NRestarts, InvocationID): both change when systemd or a health check restarts UNIT."""
    out = host(name).check_output(f"systemctl show -p NRestarts -p InvocationID --value {unit}")
    restarts, invocation = out.split()
    return restarts, invocation


def psql(query: str) -> str:
    result = host(DATA).run(f"runuser -u postgres -- psql -d mailworker -Atc {shlex.quote(query)}")
    assert result.rc == 0, result.stderr
    return result.stdout.strip()


def address_of(name: str) -> str:
    return docker(
        "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", name
    ).stdout.strip()
