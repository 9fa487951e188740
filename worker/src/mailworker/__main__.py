"""`python -m mailworker`: the CLI, for callers that have the package but not its script."""

from mailworker.cli.main import main

main()
