"""The two kinds of failure every task distinguishes.

Transient errors (a refused connection, a timeout, a database that is restarting) are retried with
exponential backoff; permanent ones (bad credentials, malformed input, a tenant mismatch) fail at
once. Messages never carry a secret.
"""


class MailworkerError(Exception):
    """Base of the application's own errors."""


class TransientError(MailworkerError):
    """Worth retrying: the same call may succeed later."""


class PermanentError(MailworkerError):
    """Not worth retrying: the same call fails the same way."""


class ConfigurationError(PermanentError):
    """A setting is missing or malformed; the message names the variable."""


class InvalidTaskArguments(PermanentError):
    """A task argument is missing, of the wrong type or malformed."""


class TenantMismatch(PermanentError):
    """The tenant, user and account (or messages) do not belong together."""


class AuthenticationFailed(PermanentError):
    """The mail server refused the account's credentials."""


class AttemptSuperseded(MailworkerError):
    """A later attempt of the same work took over (this one froze, e.g. a paused VM): this
    attempt must stop without writing anything; its task ends quietly, neither failed nor
    retried."""
