"""The Redis master lost under load, with Sentinel and TLS (docs/reliability.md). The master
host's redis-server and its Sentinel are frozen (`systemctl kill -s SIGSTOP` on their units: a
host that stopped answering, which systemd does not restart; PostgreSQL, the mail servers and the
units on the hosts keep running). At the role's default Sentinel timings the two other Sentinels
promote the replica while the load runs on; then every accepted task is counted: none twice, none
lost but what asynchronous replication may lose (accepted within REPLICATION_WINDOW before the
freeze, printed). Then both are resumed: the old master rejoins as a replica of the new one, every
Sentinel names the new master, a beat leads on it and sends periodic tasks, the workers of both
hosts answer (their sandboxed health checks too), and no worker unit was restarted meanwhile (a
broker outage restarts nothing). Counts and timings are printed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import (
    APP_HOSTS,
    DATA,
    INVENTORY,
    REDIS_HOSTS,
    ROOT,
    SENTINEL_HOSTS,
    WORKER_A,
    WORKER_UNITS,
    Load,
    address_of,
    beat_sends,
    host,
    leader,
    setting,
    unit_runs,
    wait_for,
    workers_answer,
)
from testinfra.utils.ansible_runner import AnsibleRunner

pytestmark = [
    pytest.mark.units("celery-worker.service", "celery-worker@io.service", "celery-beat.service"),
    # The Sentinels' down-after, the load's count, the rejoin and beat's takeover.
    pytest.mark.timeout(600),
]
REDIS_DEFAULTS = yaml.safe_load(
    (ROOT / "roles" / "redis" / "defaults" / "main.yml").read_text(encoding="utf-8")
)
SENTINEL_PORT = REDIS_DEFAULTS["redis_sentinel_port"]
MASTER_NAME = REDIS_DEFAULTS["redis_sentinel_master_name"]
CA = Path(REDIS_DEFAULTS["redis_tls_dir"]) / "ca.crt"
SOCKET = "/run/redis/redis-server.sock"  # roles/redis/templates/tls.conf.j2
FROZEN_UNITS = ("redis-server.service", "redis-sentinel.service")
# What the master may have acknowledged and not yet passed to its replica when it froze: on this
# network the replication lag is well under a millisecond; a second leaves room for the clocks.
REPLICATION_WINDOW = 1.0
# After the promotion: the load runs on this long against the new master.
LOAD_AFTER_PROMOTION = 10
_VARIABLES = AnsibleRunner(INVENTORY).get_variables(DATA)
# What roles/celery_health's check script logs, by verdict (nothing for a healthy check).
HEALTH_LINES = {
    "cannot check": "cannot check ",
    "failed": " failed a health check ",
    "restart": "handing it over for a restart",
    "healthy again": " is healthy again after ",
}
SENTINEL_LOG = "/var/log/redis/redis-sentinel.log"
# A Sentinel's log line (the containers run in UTC) of an event of the failover.
EVENT = re.compile(
    r"^\d+:X (\d{2} \w{3} \d{4} [\d:.]+) [#*-] ([-+](?:sdown|odown|elected-leader|"
    r"promoted-slave|switch-master|convert-to-slave|failover-end)) (.*)$"
)


def redis_cli(name: str, password_variable: str, *args: str) -> str:
    """redis-cli on host NAME with the inventory's password in REDISCLI_AUTH (passed by name to
    `docker exec`, so that it never appears on a command line or in the output)."""
    env = {**os.environ, "REDISCLI_AUTH": str(_VARIABLES[password_variable])}
    result = subprocess.run(
        ["docker", "exec", "-e", "REDISCLI_AUTH", name, "timeout", "10", "redis-cli", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )
    return result.stdout.strip() if result.returncode == 0 else ""


def sentinel(name: str, *command: str) -> list[str]:
    """A command to the Sentinel of host NAME (over TLS, as a client); its lines ([] if none)."""
    args = ("--tls", "--cacert", str(CA), "-h", "127.0.0.1", "-p", str(SENTINEL_PORT), "--raw")
    return redis_cli(name, "redis_sentinel_password", *args, *command).splitlines()


def master_named_by(name: str) -> str:
    """The master address the Sentinel of host NAME gives clients ('' when it does not answer)."""
    answer = sentinel(name, "SENTINEL", "get-master-addr-by-name", MASTER_NAME)
    return answer[0] if answer else ""


def role_of(name: str) -> list[str]:
    """ROLE of host NAME's redis-server (Unix socket, as the Sentinels' ACL user)."""
    args = ("--user", REDIS_DEFAULTS["redis_sentinel_auth_user"], "-s", SOCKET, "--raw", "ROLE")
    return redis_cli(name, "redis_sentinel_auth_password", *args).splitlines()


def sentinel_events(name: str, since: float) -> list[str]:
    """The failover's events in the log of host NAME's Sentinel: 'seconds after SINCE event'."""
    log = host(name).run(f"tail -n 200 {SENTINEL_LOG}").stdout
    events = []
    for found in map(EVENT.match, log.splitlines()):
        if found:
            stamp = datetime.strptime(found.group(1), "%d %b %Y %H:%M:%S.%f").replace(tzinfo=UTC)
            if stamp.timestamp() >= since:
                events.append(
                    f"{stamp.timestamp() - since:.1f} s {found.group(2)} {found.group(3)}"
                )
    return events


def freeze(name: str, *, signal: str) -> None:
    done = host(name).run(f"systemctl kill -s {signal} {' '.join(FROZEN_UNITS)}")
    assert done.rc == 0, done.stderr


def process_state(name: str, unit: str) -> str:
    """ps's STAT of the main process of UNIT on host NAME (T: stopped)."""
    pid = host(name).check_output(f"systemctl show -p MainPID --value {unit}")
    return host(name).check_output(f"ps -o stat= -p {pid}")


def health_verdicts(name: str, since: float) -> dict[str, int]:
    """How the worker units' health checks on host NAME judged since SINCE (epoch): their journal
    lines by kind (a healthy check writes none, unless it ends a run of failures)."""
    kinds = dict.fromkeys(HEALTH_LINES, 0)
    for unit in WORKER_UNITS:
        check = unit.removesuffix(".service").replace("@", "-") + "-health.service"
        lines = host(name).run(f"journalctl -u {check} --since @{int(since)} -o cat --no-pager")
        for line in lines.stdout.splitlines():
            for kind, text in HEALTH_LINES.items():
                kinds[kind] += text in line
    return kinds


def run_worker_health_checks(name: str) -> dict[str, int]:
    """Run the worker units' health check services now (in their sandbox, with their
    IPAddressAllow=) and return how they judged."""
    started = time.time() - 1
    for unit in WORKER_UNITS:
        check = unit.removesuffix(".service").replace("@", "-") + "-health.service"
        done = host(name).run(f"systemctl start {check}")
        assert done.rc == 0, done.stderr
    return health_verdicts(name, started)


def worker_runs() -> dict[tuple[str, str], tuple[str, str]]:
    return {(name, unit): unit_runs(name, unit) for name in APP_HOSTS for unit in WORKER_UNITS}


def sentinel_timings(name: str) -> float:
    """down-after as the Sentinels run it (seconds); the role's defaults, never shortened here."""
    answer = sentinel(name, "SENTINEL", "master", MASTER_NAME)
    values = dict(zip(answer[::2], answer[1::2], strict=True))
    assert int(values["down-after-milliseconds"]) == REDIS_DEFAULTS["redis_sentinel_down_after_ms"]
    assert int(values["failover-timeout"]) == REDIS_DEFAULTS["redis_sentinel_failover_timeout_ms"]
    return int(values["down-after-milliseconds"]) / 1000


def fail_over_under_load(master: str, replica: str, down_after: float) -> dict[str, Any]:
    """Freeze the master host's Redis and Sentinel under load, wait for the other Sentinels to
    promote the replica, count; resume whatever happened."""
    new_master = address_of(replica)
    watchers = [name for name in SENTINEL_HOSTS if name != master]
    load = Load("redis-failover", rate=2, count=300, seconds=150)
    time.sleep(5)
    frozen_at = time.time()
    freeze(master, signal="SIGSTOP")
    frozen_by = time.time()
    try:
        states = {unit: process_state(master, unit) for unit in FROZEN_UNITS}
        assert all(state.startswith("T") for state in states.values()), states
        # Odown after down-after, then one vote and the promotion (seconds). A split vote of the
        # two live Sentinels would retry only after 2 x failover-timeout: beyond this bound.
        bound = down_after + 30
        promoted = wait_for(
            lambda: all(master_named_by(name) == new_master for name in watchers), bound, 0.5
        )
        promoted_at = time.time()
        assert promoted, f"no promotion of {replica} within {bound} s of the freeze"
        time.sleep(LOAD_AFTER_PROMOTION)
        load.stop()
        # The sends whose publish failed wait for the sweeper (beat, on the new master): a beat
        # lease and a sweep interval after the promotion, then the visibility timeout for the
        # acks that were lost with the old master.
        counts = load.counts(wait=setting("BEAT_LEASE") + setting("SEND_SWEEP_INTERVAL") + 60)
    finally:
        freeze(master, signal="SIGCONT")
    run = json.loads(host(WORKER_A).file(load.run_file).content_string)  # the loadgen's host
    return {
        "counts": counts,
        "frozen_at": frozen_at,
        "frozen_by": frozen_by,
        "promoted_at": promoted_at,
        "thawed_at": time.time(),
        "syncs_on_new_master": sum(1 for sync in run["syncs"] if sync["at"] > promoted_at),
    }


def test_losing_the_redis_master_fails_over_under_load_and_loses_nothing():
    # The `redis` group's first host is the first master (Molecule lists a group's hosts by name);
    # whichever the Sentinels name is frozen, the other `redis` host is its replica.
    named = {name: master_named_by(name) for name in SENTINEL_HOSTS}
    by_address = {address_of(name): name for name in REDIS_HOSTS}
    assert len(set(named.values())) == 1, f"the Sentinels disagree before the fault: {named}"
    old_master = named[SENTINEL_HOSTS[0]]
    assert old_master in by_address, named
    master = by_address[old_master]
    (replica,) = [name for name in REDIS_HOSTS if name != master]
    new_master = address_of(replica)
    watcher = next(name for name in SENTINEL_HOSTS if name != master)
    down_after = sentinel_timings(watcher)
    runs_before = worker_runs()

    outage = fail_over_under_load(master, replica, down_after)
    counts, frozen_at = outage["counts"], outage["frozen_at"]
    promoted_after = round(outage["promoted_at"] - frozen_at, 1)
    lost_after_freeze = [round(at - frozen_at, 3) for at in counts["lost_accepted_at"]]
    print(
        f"\nredis failover: froze the master and its Sentinel for"
        f" {round(outage['thawed_at'] - frozen_at)} s on {master}; {replica} promoted"
        f" {promoted_after} s"
        f" after the freeze (down-after {down_after:g} s); lost {counts['lost']} (accepted"
        f" {lost_after_freeze} s after the freeze), doubled {counts['doubled']}; syncs accepted"
        f" by the new master: {outage['syncs_on_new_master']}",
        flush=True,
    )
    assert counts["submitted_sends"] > 0, counts
    assert counts["doubled"] == 0, counts
    # Only what the master had acknowledged in the instant before it froze may be missing on the
    # promoted replica (docs/operations.md, "What asynchronous replication can lose").
    window = (-REPLICATION_WINDOW, outage["frozen_by"] - frozen_at)
    assert all(window[0] <= gap <= window[1] for gap in lost_after_freeze), counts
    if counts["lost"] == 0:
        assert counts["ok"], counts
    assert outage["syncs_on_new_master"] > 0, "the load accepted nothing on the new master"

    # The old master comes back as a replica of the new one; every Sentinel agrees.
    replica_of_new_master = ["slave", new_master, str(REDIS_DEFAULTS["redis_port"]), "connected"]
    rejoined = wait_for(lambda: role_of(master)[:4] == replica_of_new_master, 60, 1)
    assert rejoined, f"ROLE on {master}: {role_of(master)}"
    agreed = wait_for(
        lambda: all(master_named_by(name) == new_master for name in SENTINEL_HOSTS), 60, 1
    )
    rejoined_after = round(time.time() - outage["thawed_at"], 1)
    assert agreed, {name: master_named_by(name) for name in SENTINEL_HOSTS}

    # A beat leads on the new master and sends periodic tasks (what came due meanwhile at once).
    lease, loop = setting("BEAT_LEASE"), setting("BEAT_MAX_LOOP_INTERVAL")
    holder = wait_for(leader, lease + 2 * loop, 2)
    assert holder in {f"celery-beat@{name}" for name in APP_HOSTS}, holder
    sent = wait_for(
        lambda: sorted(
            at for name in APP_HOSTS for at, _ in beat_sends(name, outage["promoted_at"])
        ),
        lease + loop + setting("SEND_SWEEP_INTERVAL"),
        2,
    )
    assert sent, f"no periodic task sent since the promotion ({holder} leads)"

    assert all(wait_for(lambda name=name: workers_answer(name), 60, 5) for name in APP_HOSTS)
    # The health units judge the workers on the new master too (not "cannot check").
    during = {name: health_verdicts(name, frozen_at) for name in APP_HOSTS}
    now = {name: run_worker_health_checks(name) for name in APP_HOSTS}
    print(f"redis failover: health checks since the freeze {during}; run now {now}", flush=True)
    assert all(v["cannot check"] == v["failed"] == v["restart"] == 0 for v in now.values()), now
    runs_after = worker_runs()
    print(
        f"redis failover: old master a replica of the new one and all Sentinels agreeing"
        f" {rejoined_after} s after the resume; {holder} leads, first periodic task sent"
        f" {round(sent[0] - outage['promoted_at'], 1)} s after the promotion; worker units"
        f" (NRestarts, InvocationID) before {runs_before}, after {runs_after};"
        f" {watcher}'s Sentinel since the freeze: {sentinel_events(watcher, frozen_at)}",
        flush=True,
    )
    assert runs_after == runs_before, "a worker unit was restarted during the broker outage"
