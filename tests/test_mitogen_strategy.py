"""The playbooks run under Mitogen (ansible.cfg): what that relies on, checked on the tree.

Mitogen never finishes an async `docker_container` (mitogen-hq/mitogen#835), so the project's
roles and playbooks use no async task; it takes over a connection only by its short name, so the
lab names `docker`, not `community.docker.docker`. Molecule's scenarios prove the playbooks
themselves under Mitogen.
"""

from __future__ import annotations

import functools
import gc
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ansible_mitogen.module_finder as finder
import ansible_mitogen.planner
import yaml
from ansible import constants
from ansible.executor.module_common import _MODULE_UTILS_PATH
from ansible.plugins.loader import init_plugin_loader, module_loader, module_utils_loader

from tests.fixtures.source_files import load_file

REPO = Path(__file__).resolve().parent.parent
ANSIBLE = Path(sys.executable).parent


def _tasks(node: Any, become: Any = None) -> Iterator[tuple[dict[str, Any], Any]]:
    """Every mapping in a task file or playbook that could be a task (blocks and plays
    included), with the `become` it has or inherits from its block or play."""
    if isinstance(node, list):
        for item in node:
            yield from _tasks(item, become)
    elif isinstance(node, dict):
        become = node.get("become", become)
        yield node, become
        for key in ("tasks", "pre_tasks", "post_tasks", "handlers", "block", "rescue", "always"):
            yield from _tasks(node.get(key), become)


def _strategy_plugin() -> Any:
    """The project's strategy plugin (plugins/strategy/mitogen_linear.py), as a fresh module."""
    return load_file("mitogen_linear", "plugins/strategy/mitogen_linear.py")


def _ansible_files() -> list[Path]:
    files = [*REPO.glob("roles/*/tasks/*.yml"), *REPO.glob("roles/*/handlers/*.yml")]
    files += [*REPO.glob("playbooks/**/*.yml")]
    return sorted(files)


def test_no_role_or_playbook_task_is_async() -> None:
    files = _ansible_files()
    assert len(files) > 20, files
    found = [
        f"{path.relative_to(REPO)}: {task.get('name', '?')}"
        for path in files
        for task, _ in _tasks(yaml.safe_load(path.read_text(encoding="utf-8")))
        if "async" in task
    ]
    assert found == [], f"async tasks never finish under Mitogen (mitogen-hq/mitogen#835): {found}"


def test_every_task_on_the_controller_runs_without_become() -> None:
    """The controller's own tasks never ask for sudo (Mitogen runs it on the controller, and
    fails where there is none). An inventory that sets `ansible_become` for all hosts exempts
    localhost as well (production.example's host_vars/localhost.yml): the variable wins over
    this keyword; tests/test_nomad_jobs.py runs that inventory's controller tasks."""
    found = [
        f"{path.relative_to(REPO)}: {task.get('name', '?')}"
        for path in _ansible_files()
        for task, become in _tasks(yaml.safe_load(path.read_text(encoding="utf-8")))
        if task.get("delegate_to") == "localhost" and become is not False
    ]
    assert found == [], f"delegated to localhost without become: false: {found}"


def test_the_lab_names_the_docker_connection_by_its_short_name() -> None:
    hosts = (REPO / "inventories" / "lab" / "hosts.yml").read_text(encoding="utf-8")
    assert "ansible_connection: docker\n" in hosts
    assert "community.docker.docker" not in hosts


def _ansible(command: str, *args: str) -> subprocess.CompletedProcess[str]:
    """An Ansible command of the virtualenv, run with the repository's ansible.cfg."""
    return subprocess.run(
        [str(ANSIBLE / command), *args],
        cwd=REPO,
        env={**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg")},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def test_the_repository_config_runs_playbooks_with_mitogen() -> None:
    config = _ansible("ansible-config", "dump", "--only-changed")
    assert config.returncode == 0, config.stderr
    dumped = config.stdout
    strategy = [line for line in dumped.splitlines() if line.startswith("DEFAULT_STRATEGY(")]
    assert strategy, dumped
    assert strategy[0].endswith("= mitogen_linear"), strategy
    # The strategy plugin loads (else: "Invalid play strategy"): a one-task play runs through it.
    play = _ansible("ansible", "localhost", "-m", "ansible.builtin.ping")
    assert play.returncode == 0, play.stdout + play.stderr
    assert "pong" in play.stdout, play.stdout


def test_a_process_forked_by_the_strategy_keeps_the_controllers_objects_frozen() -> None:
    """The strategy forks each task's worker inside `frozen_heap`: the worker's collector never
    walks the controller's objects, and the controller's own are thawed after the fork."""
    plugin = _strategy_plugin()
    frozen_heap = plugin.frozen_heap
    assert gc.get_freeze_count() == 0
    read, write = os.pipe()
    with frozen_heap():
        frozen = gc.get_freeze_count()
        pid = os.fork()
        if pid == 0:  # the worker: reports what its collector leaves alone, after a collection
            gc.collect()
            os.write(write, str(gc.get_freeze_count()).encode())
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as answer:
        in_worker = int(answer.read())
    os.waitpid(pid, 0)
    assert frozen > 1000, frozen
    # (the few the worker freed on its way out of the fork leave the frozen set)
    assert in_worker > frozen * 0.99, (in_worker, frozen)
    assert gc.get_freeze_count() == 0


@functools.cache
def _find_collections() -> None:
    """Ansible's collection finder, as ansible-playbook sets it up (once per process)."""
    init_plugin_loader(constants.COLLECTIONS_PATHS)


def test_mitogen_gets_the_collections_listed_once_and_the_same_directories() -> None:
    """The strategy lists the collections' directories once for Mitogen's planner: a worker adds
    the same import paths as Mitogen's own listing did, without listing them again."""
    _find_collections()
    plugin = _strategy_plugin()

    class Invocation:
        def __init__(self) -> None:
            self._extra_sys_paths: set[str] = set()

    mitogens, ours = Invocation(), Invocation()
    original = ansible_mitogen.planner._load_collections
    try:
        original(mitogens)
        plugin._list_collections_once()
        listed = ansible_mitogen.planner._load_collections
        plugin._list_collections_once()  # a second play's run: nothing listed again
        assert ansible_mitogen.planner._load_collections is listed
        listed(ours)
    finally:
        ansible_mitogen.planner._load_collections = original
    assert listed is not original
    assert any(path.endswith("/community/postgresql") for path in mitogens._extra_sys_paths)
    assert ours._extra_sys_paths == mitogens._extra_sys_paths


def test_mitogens_import_scan_compiles_each_file_once_with_the_same_result() -> None:
    """Mitogen's scan of two modules' imports finds the same module_utils with the strategy's
    compile-once in place, and compiles the files the modules share only once."""
    _find_collections()
    plugin = _strategy_plugin()
    search = (*module_utils_loader._get_paths(subdirs=False), _MODULE_UTILS_PATH)
    modules = [
        (f"ansible_module_{name}", module_loader.find_plugin(f"ansible.builtin.{name}", ""))
        for name in ("file", "stat")
    ]
    plain = [finder.scan(name, path, search) for name, path in modules]
    plugin._scan_compiles_each_file_once()
    try:
        once = [finder.scan(name, path, search) for name, path in modules]
        compiled = plugin._compile_once.cache_info()
    finally:
        del finder.compile  # Python's own compile again
    assert once == plain
    assert len(plain[0]) > 20, plain[0]  # basic.py and what it imports
    shared = {path for _, path, _ in plain[0]} & {path for _, path, _ in plain[1]}
    assert len(shared) > 20, shared
    assert compiled.hits >= len(shared), compiled
