"""The `mailworker` command line as an operator runs it: a subprocess, real PostgreSQL and Redis.

Bad configuration must give one line naming the variable, exit status 1 and no traceback, in
every command that reads the settings.
"""

import json
import os
import shlex
import subprocess
import time

import pytest
from cryptography.fernet import Fernet
from mailworker.db.migrate import head_revision
from mailworker.db.models import MailAccount
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from tests.fixtures.servers import ENCRYPTION_KEY, MAILWORKER, OLD_ENCRYPTION_KEY

GOOD = {
    "MAILWORKER_BROKER_URL": "redis://:brokersecret@127.0.0.1:6399/0",
    "MAILWORKER_DATABASE_URL": "postgresql+psycopg2://mw:dbsecret@127.0.0.1:5499/mw",
    "MAILWORKER_ENCRYPTION_KEYS": ENCRYPTION_KEY,
}


def clean_env(**variables: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILWORKER_")}
    env.update(variables)
    return env


def mailworker(*args: str, env: dict[str, str], stdin: str | None = None, timeout: float = 60):
    return subprocess.run(
        [MAILWORKER, *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


BAD_CONFIGURATIONS = [
    ({"MAILWORKER_CONCURRENCY": "lots"}, "MAILWORKER_CONCURRENCY: expected a whole number"),
    ({"MAILWORKER_SOFT_TIME_LIMIT": "1300"}, "MAILWORKER_SOFT_TIME_LIMIT (1300) must be below"),
    ({"MAILWORKER_BROKER_URL": ""}, "MAILWORKER_BROKER_URL is required but not set"),
    ({"MAILWORKER_ENCRYPTION_KEYS": "c2hvcnQ="}, "MAILWORKER_ENCRYPTION_KEYS: key 1 of 1 is not"),
    ({"MAILWORKER_QUEUES": "sync,urgent"}, "MAILWORKER_QUEUES: unknown urgent"),
    ({"MAILWORKER_POOL": "eventlet"}, "MAILWORKER_POOL: expected one of prefork"),
]
COMMANDS = [
    ("config", "check"),
    ("run", "worker"),
    ("health", "worker"),
    ("db", "upgrade"),
    ("account", "list"),
]


def test_bad_configuration_gives_one_line_and_no_traceback():
    # Every bad setting through `config check`, the first one through every command; run
    # concurrently to keep this quick.
    pairs = [(bad, ("config", "check")) for bad in BAD_CONFIGURATIONS]
    pairs += [(BAD_CONFIGURATIONS[0], command) for command in COMMANDS[1:]]
    runs = []
    for (overrides, expected), command in pairs:
        env = clean_env(**{**GOOD, **overrides})
        process = subprocess.Popen(
            [MAILWORKER, *command],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        runs.append((command, expected, process))
    for command, expected, process in runs:
        out, err = process.communicate(timeout=120)
        shown = f"mailworker {shlex.join(command)}:\nstdout: {out}\nstderr: {err}"
        assert process.returncode == 1, shown
        assert err.splitlines() == [f"Error: {err.strip().removeprefix('Error: ')}"], shown
        assert expected in err, shown
        assert "Traceback" not in out + err, shown
        assert "brokersecret" not in out + err, shown


def test_config_check_prints_effective_settings_with_secrets_masked():
    ran = mailworker("config", "check", env=clean_env(**GOOD, MAILWORKER_CONCURRENCY="7"))
    assert ran.returncode == 0, ran.stderr
    lines = dict(line.split(None, 1) for line in ran.stdout.splitlines())
    assert lines["MAILWORKER_CONCURRENCY"] == "7"
    assert lines["MAILWORKER_BROKER_URL"] == "redis://:********@127.0.0.1:6399/0"
    assert lines["MAILWORKER_RESULT_BACKEND"] == "redis://:********@127.0.0.1:6399/1"
    assert lines["MAILWORKER_ENCRYPTION_KEYS"] == "******** (1 key)"
    for secret in ("brokersecret", "dbsecret", ENCRYPTION_KEY):
        assert secret not in ran.stdout + ran.stderr


def test_config_check_warns_about_unknown_variables():
    ran = mailworker("config", "check", env=clean_env(**GOOD, MAILWORKER_CONCURENCY="2"))
    assert ran.returncode == 0
    assert "warning: MAILWORKER_CONCURENCY is not a mailworker setting" in ran.stderr


def test_config_check_environments_checks_each_unit_in_one_run():
    # What the deploy sends before any host changes: the shared file, then each unit's own
    # settings, one environment per unit. The process environment holds only the key, as the
    # controller's does not; each environment is judged alone, and no value is ever printed.
    shared = "\n".join(
        f'{name}="{value}"' for name, value in GOOD.items() if name != "MAILWORKER_ENCRYPTION_KEYS"
    )
    environments = {
        "celery-worker": shared + '\nMAILWORKER_CONCURRENCY="4"\n',
        "celery-worker@io": shared + '\nMAILWORKER_POOL="eventlet"\nMAILWORKER_CONCURENCY="2"\n',
        "celery-beat": 'MAILWORKER_BROKER_URL="redis://:brokersecret@127.0.0.1:6399/0"\n',
        "celery-flower": "this is not KEY=VALUE brokersecret\n",
    }
    env = clean_env(MAILWORKER_ENCRYPTION_KEYS=ENCRYPTION_KEY)
    ran = mailworker(
        "config", "check", "--environments", "-", env=env, stdin=json.dumps(environments)
    )
    shown = f"stdout: {ran.stdout}\nstderr: {ran.stderr}"
    assert ran.returncode == 1, shown
    results = json.loads(ran.stdout)
    assert list(results) == list(environments), shown
    assert results["celery-worker"] == {"ok": True, "error": None, "unknown": []}, shown
    assert results["celery-worker@io"]["ok"] is False, shown
    assert results["celery-worker@io"]["error"].startswith("MAILWORKER_POOL: expected one of")
    assert results["celery-worker@io"]["unknown"] == ["MAILWORKER_CONCURENCY"], shown
    assert results["celery-beat"]["error"] == "MAILWORKER_DATABASE_URL is required but not set"
    assert results["celery-flower"]["error"] == "celery-flower: line 1 is not KEY=VALUE", shown
    for secret in ("brokersecret", "dbsecret", ENCRYPTION_KEY):
        assert secret not in ran.stdout + ran.stderr, shown


def test_config_check_environments_exits_0_when_every_unit_passes():
    environments = {
        "celery-worker": "\n".join(f'{name}="{value}"' for name, value in GOOD.items()),
        "celery-beat": "\n".join(f"{name}={value}" for name, value in GOOD.items()),
    }
    ran = mailworker(
        "config", "check", "--environments", "-", env=clean_env(), stdin=json.dumps(environments)
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert json.loads(ran.stdout) == {
        name: {"ok": True, "error": None, "unknown": []} for name in environments
    }


def test_config_check_unit_files_reads_each_units_file_under_its_name(tmp_path):
    # What the deploy runs on a host: each unit's own file, read by the command itself (as root
    # there), over the shared settings in the process environment.
    worker = tmp_path / "celery-worker.env"
    worker.write_text('MAILWORKER_CONCURRENCY="4"\n', encoding="utf-8")
    io = tmp_path / "celery-worker@io.env"
    io.write_text('MAILWORKER_POOL="eventlet"\nMAILWORKER_CONCURENCY="2"\n', encoding="utf-8")
    ran = mailworker(
        *("config", "check", f"--unit-file=celery-worker={worker}"),
        *("--unit-file", f"celery-worker@io={io}"),
        env=clean_env(**GOOD),
    )
    shown = f"stdout: {ran.stdout}\nstderr: {ran.stderr}"
    assert ran.returncode == 1, shown
    results = json.loads(ran.stdout)
    assert list(results) == ["celery-worker", "celery-worker@io"], shown
    assert results["celery-worker"] == {"ok": True, "error": None, "unknown": []}, shown
    assert results["celery-worker@io"]["error"].startswith("MAILWORKER_POOL: expected one of")
    assert results["celery-worker@io"]["unknown"] == ["MAILWORKER_CONCURENCY"], shown
    for secret in ("brokersecret", "dbsecret", ENCRYPTION_KEY):
        assert secret not in ran.stdout + ran.stderr, shown


def test_config_check_unit_files_names_a_bad_option_or_an_unreadable_file(tmp_path):
    missing = tmp_path / "celery-beat.env"
    for option, message in (
        ("--unit-file=celery-beat", "Error: --unit-file 'celery-beat': expected NAME=PATH"),
        ("--unit-file=celery-beat=", "Error: --unit-file 'celery-beat=': expected NAME=PATH"),
        (
            f"--unit-file=celery-beat={missing}",
            f"Error: --unit-file celery-beat: cannot read {missing} (No such file or directory)",
        ),
    ):
        ran = mailworker("config", "check", option, env=clean_env(**GOOD))
        assert ran.returncode == 1, ran.stdout + ran.stderr
        assert ran.stderr.startswith(message), (option, ran.stderr)
        assert ran.stdout == ""


def test_config_check_environments_refuses_what_is_not_an_object_of_texts():
    for stdin in ("not json", json.dumps(["celery-worker"]), json.dumps({"celery-worker": 4})):
        ran = mailworker("config", "check", "--environments", "-", env=clean_env(), stdin=stdin)
        assert ran.returncode == 1, ran.stdout + ran.stderr
        assert ran.stderr.startswith("Error: --environments: "), ran.stderr
        assert ran.stdout == ""


def test_run_print_shows_the_command_lines(tmp_path):
    env = clean_env(
        **GOOD,
        MAILWORKER_QUEUES="send,sync",
        MAILWORKER_CONCURRENCY="3",
        MAILWORKER_POOL="threads",
        MAILWORKER_LOG_FILE=f"{tmp_path}/{{service}}.log",
    )
    worker = shlex.split(mailworker("run", "worker", "--print", env=env).stdout)
    assert worker[1:3] == ["-m", "mailworker.worker_command"]
    for flag in (
        "--queues=send,sync",
        "--concurrency=3",
        "--pool=threads",
        "--hostname=celery-worker@%h",
        "--time-limit=1260",
        "--soft-time-limit=1200",
        f"--logfile={tmp_path}/worker.log",
        "--task-events",
    ):
        assert flag in worker
    beat = shlex.split(mailworker("run", "beat", "--print", env=env).stdout)
    assert "--scheduler=mailworker.beat:LeaseScheduler" in beat
    assert not any(arg.startswith("--schedule=") for arg in beat)  # its state lives in Redis
    flower = shlex.split(mailworker("run", "flower", "--print", env=env).stdout)
    for flag in ("--address=127.0.0.1", "--port=5555", "--url_prefix=flower", "--read_only=True"):
        assert flag in flower
    assert not any(arg.startswith("--enable_events") for arg in flower)
    quiet = {**env, "MAILWORKER_TASK_EVENTS": "false"}
    worker = shlex.split(mailworker("run", "worker", "--print", env=quiet).stdout)
    assert "--task-events" not in worker
    flower = shlex.split(mailworker("run", "flower", "--print", env=quiet).stdout)
    assert "--enable_events=False" in flower  # or Flower turns them back on in every worker
    assert not any(arg.startswith("--max-memory-per-child") for arg in worker)
    recycled = {**env, "MAILWORKER_POOL": "prefork", "MAILWORKER_MAX_MEMORY_PER_CHILD_KIB": "90000"}
    worker = shlex.split(mailworker("run", "worker", "--print", env=recycled).stdout)
    assert "--max-memory-per-child=90000" in worker

    # The log's directory does not exist: one line before anything is exec'd.
    missing = {**env, "MAILWORKER_LOG_FILE": f"{tmp_path}/logs/{{service}}.log"}
    ran = mailworker("run", "beat", env=missing)
    assert ran.returncode == 1
    assert ran.stderr.strip() == (
        f"Error: MAILWORKER_LOG_FILE: directory {tmp_path}/logs does not exist"
    )


def test_db_upgrade_is_idempotent(app_env, migrated_db):
    head = head_revision()  # the newest migration shipped, whichever helper's it is
    again = mailworker("db", "upgrade", env=app_env)
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith(f"schema at revision {head}")
    current = mailworker("db", "current", env=app_env)
    assert (current.returncode, current.stdout.strip()) == (
        0,
        f"schema at revision {head}, code expects {head}",
    )


def test_db_upgrade_reports_an_unreachable_database_in_one_line(app_env):
    env = {**app_env, "MAILWORKER_DATABASE_URL": "postgresql+psycopg2://u:pw@127.0.0.1:1/none"}
    ran = mailworker("db", "upgrade", env=env)
    assert ran.returncode == 1
    assert len(ran.stderr.strip().splitlines()) == 1, ran.stderr
    assert "Connection refused" in ran.stderr
    assert ":pw@" not in ran.stderr


def test_account_list_on_an_unmigrated_database_says_what_to_run(app_env):
    # The server's own `postgres` database has no schema.
    url = app_env["MAILWORKER_DATABASE_URL"].rpartition("/")[0] + "/postgres"
    ran = mailworker("account", "list", env={**app_env, "MAILWORKER_DATABASE_URL": url})
    assert ran.returncode == 1
    assert ran.stderr.strip().endswith(
        'relation "mail_accounts" does not exist (run `mailworker db upgrade`)'
    )
    assert len(ran.stderr.strip().splitlines()) == 1


def test_account_add_list_and_rotate_keys(app_env, migrated_db, db_engine):
    tenant = f"cli-{time.time_ns()}"
    password = "correct horse battery staple"
    # Stored with the old key only, as before a rotation.
    old_env = {**app_env, "MAILWORKER_ENCRYPTION_KEYS": OLD_ENCRYPTION_KEY}
    added = mailworker(
        "account", "add", "--tenant", tenant, "--user", "erin@example.org",
        "--imap-host", "imap.example.org", "--smtp-host", "smtp.example.org",
        "--password-stdin",
        env=old_env, stdin=password + "\n",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    ids = dict(line.split("=", 1) for line in added.stdout.splitlines())
    assert set(ids) == {"tenant_id", "user_id", "account_id"}
    assert password not in added.stdout + added.stderr

    listed = mailworker("account", "list", "--json", "--tenant", tenant, env=app_env)
    (row,) = json.loads(listed.stdout)
    assert row["account_id"] == ids["account_id"]
    assert (row["imap"], row["smtp"]) == (
        "ssl://imap.example.org:993",
        "starttls://smtp.example.org:587",
    )
    assert password not in listed.stdout

    def stored_token() -> str:
        with Session(db_engine) as session:
            account = session.scalar(select(MailAccount).where(MailAccount.id == ids["account_id"]))
            return account.password_encrypted

    token = stored_token()
    assert password not in token
    assert Fernet(OLD_ENCRYPTION_KEY).decrypt(token.encode()).decode() == password

    # app_env lists the new key first and the old one second: rotate, then the new key suffices.
    rotated = mailworker("account", "rotate-keys", env=app_env)
    assert rotated.returncode == 0, rotated.stderr
    assert Fernet(ENCRYPTION_KEY).decrypt(stored_token().encode()).decode() == password

    duplicate = mailworker(
        "account", "add", "--tenant", tenant, "--user", "erin@example.org",
        "--imap-host", "h", "--smtp-host", "h", "--password-stdin",
        env=app_env, stdin="x\n",
    )  # fmt: skip
    assert duplicate.returncode == 1
    assert duplicate.stderr.strip() == (
        f"Error: tenant {tenant} already has an account for erin@example.org"
    )
    # Its servers do not exist: keep the periodic fan-out of other tests away from it.
    with Session(db_engine) as session, session.begin():
        session.execute(
            update(MailAccount).where(MailAccount.id == ids["account_id"]).values(active=False)
        )


def test_health_worker(app_env, shared_worker):
    ok = mailworker("health", "worker", "--node", shared_worker.node, "--timeout", "5", env=app_env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.startswith("ok: test-")

    started = time.monotonic()
    missing = mailworker(
        "health", "worker", "--node", "nobody@nowhere", "--timeout", "1", env=app_env
    )
    assert missing.returncode == 1
    assert missing.stdout.strip() == "unhealthy: nobody@nowhere did not answer within 1 s"
    assert time.monotonic() - started < 15

    no_redis = mailworker(
        "health", "worker", "--timeout", "1",
        env={**app_env, "MAILWORKER_BROKER_URL": "redis://:pw@127.0.0.1:1/0"},
    )  # fmt: skip
    # Unknown, not unhealthy: a restart would not bring the broker back (the timers skip it).
    assert no_redis.returncode == 3
    assert no_redis.stdout.startswith("unknown: cannot reach the broker at redis://:********@")


@pytest.mark.parametrize("command", [("health", "beat"), ("health", "worker")])
def test_health_needs_no_database(command, app_env):
    # The health timers must not depend on PostgreSQL: a wrong database URL changes nothing.
    env = {**app_env, "MAILWORKER_DATABASE_URL": "postgresql+psycopg2://u@127.0.0.1:1/none"}
    ran = mailworker(*command, "--timeout", "1", env=env)
    assert ran.returncode == 1
    assert "database" not in ran.stdout + ran.stderr
