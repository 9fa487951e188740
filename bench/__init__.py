"""Benchmarks: the shipped worker configuration against Celery's defaults, on a private Redis."""
