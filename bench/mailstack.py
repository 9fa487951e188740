"""The real servers of the mail phases: Redis, PostgreSQL, Dovecot and an SMTP server, on loopback.

They are the project's own test servers (tests/fixtures/servers.py and mailservers.py), started
here the way their pytest fixtures start them, and stopped here. PostgreSQL gets the schema from
`mailworker db upgrade`, as a deployment does.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.fernet import Fernet

from tests.fixtures.mailservers import DovecotServer, SmtpServer, TestCertificates
from tests.fixtures.mailservers import make_certificates as make_mail_certificates
from tests.fixtures.servers import PG_BIN, PostgresServer, RedisServer, free_port

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


@contextlib.contextmanager
def _postgres(directory: Path) -> Iterator[PostgresServer]:
    """What the postgres_server fixture does: initdb, start, CREATE DATABASE; stop after."""
    run_as: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        postgres = pwd.getpwnam("postgres")
        os.chown(directory, postgres.pw_uid, postgres.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    server = PostgresServer(free_port(), directory, run_as)
    server._run(
        str(PG_BIN / "initdb"), "-D", str(server.data), "-A", "trust", "-U", "postgres",
        "--no-sync", "-E", "UTF8",
    )  # fmt: skip
    server.start()
    try:
        server.psql("CREATE DATABASE mailworker")
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def _redis(directory: Path) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def _dovecot(root: Path, certificates: TestCertificates) -> Iterator[DovecotServer]:
    directory = root / "dovecot"
    directory.mkdir()
    directory.chmod(0o755)
    server = DovecotServer(directory, certificates)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def _smtp(dovecot: DovecotServer, certificates: TestCertificates) -> Iterator[SmtpServer]:
    server = SmtpServer(dovecot, certificates)
    server.start()
    try:
        yield server
    finally:
        server.stop()


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
            _redis(redis_dir) as redis,
            _postgres(pg_dir) as postgres,
            _dovecot(root, certificates) as dovecot,
            _smtp(dovecot, certificates) as smtp,
        ):
            stack = MailStack(
                redis, postgres, dovecot, smtp, certificates, Fernet.generate_key().decode()
            )
            _migrate(stack)
            yield stack
    finally:
        shutil.rmtree(root, ignore_errors=True)
