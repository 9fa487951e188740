"""Ansible's linear strategy run through Mitogen (ansible.cfg's `strategy`).

Mitogen keeps one Python interpreter per host and runs each module inside it, so a task no longer
pays for a new connection, a new interpreter and the module's imports: an unchanged task costs
about 0.1 s instead of 0.45 s (docs/benchmarks.md). The class comes from the installed
`ansible_mitogen` package (requirements-dev.txt), imported under its own name so that Ansible's
plugin loader does not load Mitogen's modules twice. `ANSIBLE_STRATEGY=linear` runs without it.

Ansible forks one worker process per task and host; two costs each worker paid again are paid
once here, in the controller's process, before it forks:
- the controller's objects are frozen for the fork (`gc.freeze`, as Python's documentation advises
  before a fork), so a worker's garbage collector never walks the controller's whole heap (a
  re-run's workers spent 5.7 s in the collector, 18 full collections of up to 0.23 s each);
- the Jinja filter and test plugins are listed once, so a worker no longer globs, imports and
  wraps every plugin file the first time a template uses a filter or a test;
- the installed collections' directories are listed once: Mitogen lists them (reading every
  collection's manifest, 93 of them with the `ansible` package) in each worker that runs a
  collection's module (community.postgresql, community.crypto...), 0.03-0.15 s a task;
- Mitogen's scan of a module's imports (its process that serves the workers, once per module a
  run) compiles each `module_utils` file once, not once per module: a re-run scans about 20
  modules, which share most of their `module_utils` (basic.py and the files it imports), and
  compiled them again for each (1.9 s of CPU for 21 modules, 0.4 s with each file compiled once).
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Iterator
from contextlib import contextmanager
from types import CodeType
from typing import Any

import ansible_mitogen.module_finder
import ansible_mitogen.planner
from ansible.collections.list import list_collection_dirs
from ansible.plugins.loader import filter_loader, test_loader
from ansible_mitogen.plugins.strategy.mitogen_linear import StrategyModule as _MitogenLinear

__all__ = ["StrategyModule", "frozen_heap"]


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Freeze every object the garbage collector tracks for the block, and thaw them after it.

    A process forked inside the block keeps them frozen: its collector only walks the objects it
    makes itself (and leaves the pages it shares with this process unwritten). This process is
    unchanged after the block: the objects are back in the oldest generation."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _list_jinja_plugins() -> None:
    """Fill the filter and test loaders' caches of plugin wrappers in this process."""
    for loader in (filter_loader, test_loader):
        for _ in loader.all():
            pass


def _list_collections_once() -> None:
    """Give Mitogen's planner the collections' directories listed once, in this process.

    `ansible_mitogen.planner._load_collections` adds every installed collection's directory to
    the module's import paths; it is the only caller of `list_collection_dirs` there, and the
    directories do not change during a run (each play's `run` finds them listed)."""
    if getattr(ansible_mitogen.planner._load_collections, "listed_once", False):
        return
    directories = frozenset(path.decode("utf-8") for path in list_collection_dirs())

    def load_collections(invocation: Any) -> None:
        invocation._extra_sys_paths.update(directories)

    load_collections.listed_once = True  # type: ignore[attr-defined]
    ansible_mitogen.planner._load_collections = load_collections


@functools.cache
def _compile_once(source: bytes, filename: str, mode: str) -> CodeType:
    """`compile`, once for each source: the same file's code object for every scan."""
    return compile(source, filename, mode)


def _scan_compiles_each_file_once() -> None:
    """Make Mitogen's import scanner (`ansible_mitogen.module_finder`, which reads each file and
    compiles it to walk its imports) compile each file once per process.

    Set before the strategy's first `run`, which starts the process that serves the workers'
    scans (a fork of this one)."""
    ansible_mitogen.module_finder.compile = _compile_once  # type: ignore[attr-defined]


class StrategyModule(_MitogenLinear):  # type: ignore[misc]
    def run(self, iterator: Any, play_context: Any, *args: Any, **kwargs: Any) -> Any:
        _list_jinja_plugins()
        _list_collections_once()
        _scan_compiles_each_file_once()
        return super().run(iterator, play_context, *args, **kwargs)

    def _queue_task(self, host: Any, task: Any, task_vars: Any, play_context: Any) -> Any:
        with frozen_heap():
            return super()._queue_task(host, task, task_vars, play_context)
