"""Rolling deploy of a new release (playbooks/deploy.yml, one host at a time, warm shutdown) and
rolling restart (playbooks/ops/restart.yml) under load: no task lost, none done twice.

The new release is what `make wheelhouse` makes of the next version: the deployed wheelhouse with
the worker's wheel rebuilt under a new version, so every host installs a new virtualenv, switches
its links and restarts its units onto it, while the previous release stays for a rollback."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
import time
import tomllib
import uuid
from pathlib import Path

import pytest
from conftest import (
    APP_HOSTS,
    PLAYBOOK_TIMEOUT,
    ROOT,
    WORKER_UNITS,
    Load,
    assert_exactly_once,
    host,
    playbook,
)

pytestmark = [
    pytest.mark.units("celery-worker.service", "celery-worker@io.service", "celery-beat.service"),
    # Above pytest.ini's 300 s: a playbook run on both hosts (up to PLAYBOOK_TIMEOUT), the count.
    pytest.mark.timeout(PLAYBOOK_TIMEOUT + 300),
]
SETTING = "MAILWORKER_SYNC_BATCH_SIZE"
WHEELHOUSE = ROOT / "build" / "wheelhouse"
UNITS = (*WORKER_UNITS, "celery-beat.service")


def under_load(tag: str, *args: str) -> dict:
    """Run the playbook while the load runs: submitting until the playbook has ended (the stop
    file), bounded by the playbook's own timeout; then count."""
    rate, ceiling = 0.5, PLAYBOOK_TIMEOUT
    load = Load(tag, rate=rate, count=int(rate * ceiling), seconds=ceiling)
    time.sleep(3)  # the first tasks are queued before the first host restarts
    started = time.monotonic()
    try:
        done = playbook(*args)
    finally:
        load.stop()
    took = round(time.monotonic() - started, 1)
    print(f"\n{tag}: playbook {took} s", flush=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr
    # The stop file ended the load, not its ceiling: it ran through the whole playbook.
    submitted = load.submitted(timeout=60)
    tasks = submitted["sends"] + submitted["syncs"] + submitted["refused"]
    assert submitted["seconds"] < ceiling - 1 / rate, (submitted, took)
    assert tasks < rate * ceiling, (submitted, took)
    return load.counts(wait=120)


def next_release(directory: Path) -> tuple[Path, str]:
    """A wheelhouse like the deployed one whose worker wheel is built under a new version, with
    its requirements.lock pinning that wheel's hash; the wheelhouse and the version."""
    source = directory / "worker"
    shutil.copytree(
        ROOT / "worker", source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    )
    current = tomllib.loads((source / "pyproject.toml").read_text())["project"]["version"]
    version = f"{current}+fleet.{uuid.uuid4().hex[:8]}"
    for path, name in (
        (source / "pyproject.toml", "version"),
        (source / "src" / "mailworker" / "__init__.py", "__version__"),
    ):
        line = re.compile(rf'^{name} = "[^"]*"$', re.MULTILINE)
        text, replaced = line.subn(f'{name} = "{version}"', path.read_text(), count=1)
        assert replaced == 1, f"no {name} line in {path}"
        path.write_text(text)
    wheelhouse = directory / "wheelhouse"
    shutil.copytree(WHEELHOUSE, wheelhouse, ignore=shutil.ignore_patterns("mailworker-*.whl"))
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"),
            *("--wheel-dir", str(wheelhouse), str(source)),
        ],
        check=True,
        timeout=300,
    )
    (wheel,) = wheelhouse.glob("mailworker-*.whl")
    digest = subprocess.run(
        ["sha256sum", str(wheel)], capture_output=True, text=True, check=True
    ).stdout.split()[0]
    lock = wheelhouse / "requirements.lock"
    lines = [line for line in lock.read_text().splitlines() if not line.startswith("mailworker==")]
    lock.write_text("\n".join([*lines, f"mailworker=={version} --hash=sha256:{digest}"]) + "\n")
    return wheelhouse, version


def current_release(name: str) -> str:
    """The release directory the host's venv link points at."""
    return str(Path(host(name).check_output("readlink -f /opt/mailworker/venv")).parent)


def runs_from(name: str, unit: str, release: str) -> bool:
    """The unit's main process has the release's files mapped (the kernel shows resolved paths,
    not the venv link)."""
    pid = host(name).check_output(f"systemctl show -p MainPID --value {unit}")
    return host(name).run(f"grep -q {release}/ /proc/{pid}/maps").rc == 0


def test_a_rolling_deploy_of_a_new_release_under_load_loses_nothing(tmp_path: Path):
    before = {name: current_release(name) for name in APP_HOSTS}
    wheelhouse, version = next_release(tmp_path)
    settings = {
        "mailworker_app_wheelhouse_src": str(wheelhouse),
        "mailworker_app_settings": {SETTING: str(random.randint(50, 99))},
    }
    counts = under_load("deploy", "deploy.yml", "-e", json.dumps(settings))
    assert_exactly_once(counts)
    for name in APP_HOSTS:
        release = current_release(name)
        assert release != before[name], f"{name} still runs {release}"
        assert host(name).check_output("mailworker --version").endswith(version)
        assert host(name).file(before[name]).is_directory, "the previous release (rollback) is gone"
        stale = [unit for unit in UNITS if not runs_from(name, unit, release)]
        assert not stale, f"{name}: {stale} do not run from the new release {release}"


def test_a_rolling_restart_under_load_loses_nothing():
    assert_exactly_once(under_load("restart", "ops/restart.yml"))
