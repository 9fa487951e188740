"""logrotate: the stanza is valid, and a rotation needs no signal (Celery reopens the file)."""

from __future__ import annotations

import pytest
from conftest import send_task

pytestmark = pytest.mark.units("celery-worker.service", "logrotate.service")


def test_logrotate_accepts_the_stanza(host):
    result = host.run("logrotate -d /etc/logrotate.d/mailworker")
    assert result.rc == 0, result.stderr
    assert "error" not in result.stderr.lower(), result.stderr


def test_stanza_never_signals_or_truncates(host):
    text = host.file("/etc/logrotate.d/mailworker").content_string
    stanza = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    for directive in ("size 10M", "rotate 3", "compress", "su celeryworker celeryworker"):
        assert directive in stanza
    for forbidden in ("postrotate", "copytruncate", "kill", "HUP"):
        assert forbidden not in stanza


def test_worker_writes_to_the_new_file_after_a_rotation_without_restarting(host, account):
    main_pid = host.service("celery-worker.service").systemd_properties["MainPID"]
    rotated = host.run("logrotate -f /etc/logrotate.d/mailworker")
    assert rotated.rc == 0, rotated.stderr
    assert host.file("/var/log/mailworker/worker.log.1").exists

    sent = send_task(host, "mailworker.tasks.sync.sync_mailbox", account.args(), wait=90)
    assert sent["state"] == "SUCCESS", sent
    new_log = host.file("/var/log/mailworker/worker.log")
    assert new_log.user == "celeryworker"
    # The main worker or the io instance ran it; either one wrote into a freshly created file.
    logs = host.run("cat /var/log/mailworker/worker.log /var/log/mailworker/worker-io.log").stdout
    assert sent["id"] in logs
    assert host.service("celery-worker.service").systemd_properties["MainPID"] == main_pid
