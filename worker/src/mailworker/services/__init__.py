"""The work behind each task, callable without Celery: sync, send, delete, classify, periodic."""
