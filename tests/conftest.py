"""Application tests run against real servers that the fixtures start on loopback."""

from pathlib import Path

pytest_plugins = ["tests.fixtures.servers"]
# The mail-server fixtures arrive with the mail services work; until then the other tests run.
if (Path(__file__).parent / "fixtures" / "mailservers.py").exists():
    pytest_plugins.append("tests.fixtures.mailservers")
