"""Celery workers for an email service: mailbox sync, sending, deletion, spam filtering."""

__version__ = "0.1.0"
