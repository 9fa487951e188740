"""The real servers of the mail phases: Redis, PostgreSQL, Dovecot and an SMTP server, on loopback.

They are the project's own test servers (tests/fixtures/servers.py and mailservers.py), started
here the way their pytest fixtures start them, and stopped here. PostgreSQL gets the schema from
`mailworker db upgrade`, as a deployment does.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.fernet import Fernet

from tests.fixtures.mailservers import (
    DovecotServer,
    SmtpServer,
    TestCertificates,
    running_dovecot,
    running_smtp,
)
from tests.fixtures.mailservers import make_certificates as make_mail_certificates
from tests.fixtures.servers import (
    PG_BIN,
    PostgresServer,
    RedisServer,
    running_postgres,
    running_redis,
)

MAILWORKER = str(Path(sys.executable).parent / "mailworker")


@dataclass(frozen=True)
class MailStack:
    redis: RedisServer
    postgres: PostgresServer
    dovecot: DovecotServer
    smtp: SmtpServer
    certificates: TestCertificates
    encryption_key: str

    @property
    def database_url(self) -> str:
        return self.postgres.url()

    def settings_env(self) -> dict[str, str]:
        """The connections a deployment sets (mailworker.env); everything else stays default."""
        return {
            "MAILWORKER_BROKER_URL": self.redis.url,
            "MAILWORKER_DATABASE_URL": self.database_url,
            "MAILWORKER_ENCRYPTION_KEYS": self.encryption_key,
            "MAILWORKER_MAIL_CA_FILE": str(self.certificates.ca_file),
        }

    def forget_deliveries(self) -> None:
        """The SMTP server keeps every message it took, in memory; the bench counts elsewhere."""
        with self.smtp._lock:
            self.smtp.deliveries.clear()

    def postgres_pid(self) -> int:
        return int((self.postgres.data / "postmaster.pid").read_text().split()[0])

    def dovecot_pid(self) -> int:
        process = self.dovecot._process
        if process is None:
            raise RuntimeError("dovecot is not running")
        return process.pid


def _migrate(stack: MailStack) -> None:
    env = {**os.environ, **stack.settings_env()}
    completed = subprocess.run(
        [MAILWORKER, "db", "upgrade"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"mailworker db upgrade failed:\n{completed.stdout}{completed.stderr}")


def missing_servers() -> str:
    """Why the mail phases cannot run here, or "" when every server is installed."""
    needed = {
        "redis-server": shutil.which("redis-server"),
        "dovecot": shutil.which("dovecot") or shutil.which("/usr/sbin/dovecot"),
        "PostgreSQL 15": str(PG_BIN / "initdb") if (PG_BIN / "initdb").exists() else None,
    }
    missing = [name for name, found in needed.items() if not found]
    if missing:
        return f"not installed: {', '.join(missing)} (make .stamps/host-test)"
    if os.geteuid() != 0:
        return "the test Dovecot needs root (it runs its processes as dovenull)"
    return ""


@contextlib.contextmanager
def running_mail_stack() -> Iterator[MailStack]:
    """Every server started, the schema applied; all of them stopped when the block ends."""
    # Not a private 0700 directory: Dovecot works as dovenull and PostgreSQL as postgres.
    root = Path(tempfile.mkdtemp(prefix="celery-fleet-bench-mail-"))
    root.chmod(0o755)
    try:
        tls = root / "tls"
        tls.mkdir()
        certificates = make_mail_certificates(tls)
        pg_dir = root / "postgres"
        redis_dir = root / "redis"
        pg_dir.mkdir()
        redis_dir.mkdir()
        with (
            running_redis(redis_dir) as redis,
            running_postgres(pg_dir) as postgres,
            running_dovecot(root, certificates) as dovecot,
            running_smtp(dovecot, certificates) as smtp,
        ):
            stack = MailStack(
                redis, postgres, dovecot, smtp, certificates, Fernet.generate_key().decode()
            )
            _migrate(stack)
            yield stack
    finally:
        shutil.rmtree(root, ignore_errors=True)
