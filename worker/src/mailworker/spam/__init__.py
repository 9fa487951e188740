"""Transparent spam scoring: a table of named, weighted rules (see mailworker.spam.rules)."""
