"""`mailworker run flower` starts the Flower that launch.build_argv describes: under its URL
prefix, persistent, and read-only (control operations refused)."""

import contextlib
import os
import signal
import subprocess
import urllib.error
import urllib.request

import pytest

from tests.fixtures.servers import MAILWORKER, free_port, wait_until

pytestmark = pytest.mark.slow


def status(url: str, method: str = "GET") -> int:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_flower_serves_under_its_prefix_read_only(isolated_env, tmp_path):
    port = free_port()
    env = {
        **isolated_env,
        "MAILWORKER_FLOWER_PORT": str(port),
        "MAILWORKER_FLOWER_DB": str(tmp_path / "flower.db"),
        # Flower answers its API only with auth configured or this switch; the proxy adds auth.
        "FLOWER_UNAUTHENTICATED_API": "true",
    }
    log = (tmp_path / "flower.log").open("wb")
    flower = subprocess.Popen(
        [MAILWORKER, "run", "flower"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}/flower"
    try:
        wait_until(
            lambda: status(f"{base}/healthcheck") == 200,
            40,
            f"Flower on port {port}\n{(tmp_path / 'flower.log').read_text(errors='replace')}",
            interval=0.3,
        )
        assert status(f"{base}/workers") == 200
        assert status(f"http://127.0.0.1:{port}/workers") == 404  # only under the prefix
        assert status(f"{base}/api/worker/shutdown/anyone", method="POST") == 403
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(flower.pid, signal.SIGTERM)
        flower.wait(20)
        log.close()
    assert (tmp_path / "flower.db").exists() or any(tmp_path.glob("flower.db*"))
