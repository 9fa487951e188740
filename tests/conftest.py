"""Application tests run against real servers that the fixtures start on loopback."""

import pytest

from tests.fixtures.vanished import remove_leftover_rules

pytest_plugins = [
    "tests.fixtures.servers",
    "tests.fixtures.mailservers",
    "tests.fixtures.sentinel",
]


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):
        return  # an xdist worker: the controller has cleaned up before any worker started
    for rule in remove_leftover_rules():
        warning = pytest.PytestWarning(f"removed a rule a killed test run left behind: {rule}")
        config.issue_config_time_warning(warning, stacklevel=2)
