"""Ansible's linear strategy run through Mitogen (ansible.cfg's `strategy`).

Mitogen keeps one Python interpreter per host and runs each module inside it, so a task no longer
pays for a new connection, a new interpreter and the module's imports: an unchanged task costs
about 0.1 s instead of 0.45 s (docs/benchmarks.md). The class comes from the installed
`ansible_mitogen` package (requirements-dev.txt), imported under its own name so that Ansible's
plugin loader does not load Mitogen's modules twice. `ANSIBLE_STRATEGY=linear` runs without it.
"""

from ansible_mitogen.plugins.strategy.mitogen_linear import StrategyModule

__all__ = ["StrategyModule"]
