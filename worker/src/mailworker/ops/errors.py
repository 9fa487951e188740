"""Failures an operator can act on, each carrying the exit code the CLI returns for it."""

EXIT_OK = 0
EXIT_UNHEALTHY = 1
EXIT_USAGE = 2


class OpsError(Exception):
    """A one-line, secret-free message for the operator plus the process exit code."""

    exit_code = EXIT_UNHEALTHY


class NotFound(OpsError):
    """The task, queue entry or worker asked about does not exist."""


class Unhealthy(OpsError):
    """The fleet answered, and what it said is not healthy (no worker, queue too deep)."""


class Unreachable(OpsError):
    """The broker, result backend or Flower did not answer within the timeout."""


class BadInput(OpsError):
    """The command line names something that cannot exist (a malformed id, an unknown queue)."""

    exit_code = EXIT_USAGE


class Refused(OpsError):
    """A destructive command was run without its explicit confirmation."""

    exit_code = EXIT_USAGE
