"""Celery tasks, one module per queue. Each task validates its arguments, checks tenancy, calls
a service and returns a small JSON-able dict; tasks/base.py holds the shared error policy."""
