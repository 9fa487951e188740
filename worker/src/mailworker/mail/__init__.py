"""Mail protocol services: IMAP sessions, SMTP sending, and the endpoint both connect to.

Celery-free on purpose: tasks call these functions, and the tests drive them against real servers.
Every failure surfaces as a mailworker.errors exception that says whether a retry can help.
"""
