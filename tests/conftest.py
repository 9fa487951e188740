"""Application tests run against real servers that the fixtures start on loopback."""

pytest_plugins = [
    "tests.fixtures.servers",
    "tests.fixtures.mailservers",
    "tests.fixtures.sentinel",
]
