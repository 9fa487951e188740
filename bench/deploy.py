"""Deploy time: playbooks/site.yml on one fresh lab container, then the idempotent re-run.

The bench makes its own one-host lab (every inventory group on one container named
celery-fleet-bench, with the lab's group_vars, on its own Docker network and HTTPS port), so the
shared lab of `make lab` is left alone. Measured twice: with the repository's ansible.cfg
(Mitogen, pipelining, fact cache, forks) and with those four back at Ansible's defaults. Each
variant starts from a new container (`playbooks/lab.yml`), so the first run is a full converge.
The bench's container and network are removed at the end.
"""

from __future__ import annotations

import configparser
import contextlib
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench.redis_server import free_port

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PATH_KEYS = ("inventory", "roles_path", "collections_path", "fact_caching_connection")
HOST = "celery-fleet-bench"
NETWORK = "celery-fleet-bench"
PROFILE = re.compile(r"^(\S.*?) -{3,} (\d+\.\d+)s$", re.M)
RECAP = re.compile(r"^\S+\s+: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


@dataclass(frozen=True)
class DeployTiming:
    variant: str
    converge_seconds: float
    rerun_seconds: float
    rerun_changed: int
    hosts: int
    slowest: tuple[tuple[str, float], ...] = ()  # the re-run's slowest tasks (profile_tasks)


class DeployFailed(RuntimeError):
    """A playbook failed; the message carries the end of its output."""


def _plain_config(directory: Path) -> Path:
    """ansible.cfg without Mitogen, with pipelining off, no fact cache and 5 forks (Ansible's
    defaults)."""
    config = configparser.ConfigParser(interpolation=None)
    config.read(REPO / "ansible.cfg")
    defaults = config["defaults"]
    for key in PATH_KEYS:
        if key in defaults:
            parts = [
                str(REPO / p) if p and not p.startswith(("/", "~")) else p
                for p in defaults[key].split(":")
            ]
            defaults[key] = ":".join(parts)
    defaults["forks"] = "5"
    defaults["fact_caching"] = "memory"
    for key in ("strategy", "strategy_plugins"):  # Ansible's own linear strategy, no Mitogen
        defaults.pop(key, None)
    for section in ("connection", "ssh_connection"):
        if config.has_section(section):
            config[section]["pipelining"] = "false"
    path = directory / "ansible-plain.cfg"
    with path.open("w") as handle:
        config.write(handle)
    return path


def _one_host_inventory(directory: Path) -> Path:
    """The lab inventory with every group on one host; the lab's group_vars, linked."""
    lab = yaml.safe_load((REPO / "inventories" / "lab" / "hosts.yml").read_text())

    def one_host(group: dict[str, Any]) -> dict[str, Any]:
        group = dict(group)
        if "hosts" in group:
            group["hosts"] = {HOST: None}
        if "children" in group:
            group["children"] = {
                name: one_host(child or {}) for name, child in group["children"].items()
            }
        return group

    inventory = directory / "inventory"
    inventory.mkdir()
    (inventory / "hosts.yml").write_text(yaml.safe_dump({"all": one_host(lab["all"])}))
    (inventory / "group_vars").symlink_to(REPO / "inventories" / "lab" / "group_vars")
    return inventory


def _playbook(args: list[str], config: Path, timeout: float) -> tuple[float, str]:
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(config),
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
    }
    started = time.monotonic()
    try:
        process = subprocess.run(
            [str(BIN / "ansible-playbook"), *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise DeployFailed(f"ansible-playbook {' '.join(args)} took over {timeout:.0f} s") from None
    elapsed = time.monotonic() - started
    if process.returncode != 0:
        tail = "\n".join(process.stdout.splitlines()[-25:])
        raise DeployFailed(f"ansible-playbook {' '.join(args)} failed:\n{tail}")
    return elapsed, process.stdout


def _lab(inventory: Path, state: str, config: Path) -> None:
    lab_vars = f"lab_state={state} lab_network={NETWORK} lab_https_port={free_port()}"
    _playbook(["-i", str(inventory), "playbooks/lab.yml", "-e", lab_vars], config, 900)


def _measure(variant: str, config: Path, inventory: Path) -> DeployTiming:
    repo_config = REPO / "ansible.cfg"
    _lab(inventory, "absent", repo_config)
    _lab(inventory, "present", repo_config)
    site = ["-i", str(inventory), "playbooks/site.yml"]
    converge, _ = _playbook(site, config, 2400)
    rerun, output = _playbook(site, config, 900)
    recap = RECAP.findall(output)
    return DeployTiming(
        variant=variant,
        converge_seconds=converge,
        rerun_seconds=rerun,
        rerun_changed=sum(int(changed) for _, changed, _, _ in recap),
        hosts=len(recap),
        slowest=tuple(
            sorted(
                ((name, float(sec)) for name, sec in PROFILE.findall(output)), key=lambda t: -t[1]
            )[:5]
        ),
    )


def lab_available() -> str:
    """Empty when the lab can be deployed here, else why not."""
    if not (REPO / "playbooks" / "lab.yml").exists():
        return "playbooks/lab.yml does not exist yet"
    if not (REPO / "build" / "wheelhouse").is_dir():
        return "no wheelhouse (make wheelhouse)"
    docker = subprocess.run(["docker", "info"], capture_output=True, check=False)
    if docker.returncode != 0:
        return "the Docker engine is not running (make docker)"
    return ""


def measure_deploy(work_dir: Path) -> list[DeployTiming]:
    repo_config = REPO / "ansible.cfg"
    plain = _plain_config(work_dir)
    inventory = _one_host_inventory(work_dir)
    try:
        return [
            _measure(
                "Ansible defaults (no Mitogen, no pipelining, no fact cache, 5 forks)",
                plain,
                inventory,
            ),
            _measure(
                "repository ansible.cfg (Mitogen, pipelining, fact cache, 20 forks)",
                repo_config,
                inventory,
            ),
        ]
    finally:
        with contextlib.suppress(DeployFailed):
            _lab(inventory, "absent", repo_config)
