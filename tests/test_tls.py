"""TLS to Redis: a redis-server with only a TLS port on loopback; the worker, its result backend,
beat's lease client and the health check verify its certificate against MAILWORKER_REDIS_CA_FILE,
and a client with another CA (or none) fails with the verification error."""

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from mailworker.redis_client import redis_from_url
from mailworker.settings import load_settings

from tests.fixtures.mailservers import make_certificates
from tests.fixtures.servers import MAILWORKER, celery_client, free_port, wait_until

CLEANUP = "mailworker.tasks.periodic.cleanup_stale_tasks"


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Any]]:
    directory = tmp_path_factory.mktemp("tls-redis")
    certificates = make_certificates(directory)
    port = free_port()
    # As roles/redis configures it with TLS on: no plaintext TCP port.
    process = subprocess.Popen(
        [
            "redis-server", "--bind", "127.0.0.1", "--port", "0", "--tls-port", str(port),
            "--tls-cert-file", str(certificates.cert_file),
            "--tls-key-file", str(certificates.key_file),
            "--tls-ca-cert-file", str(certificates.ca_file),
            "--tls-auth-clients", "no",
            "--save", "", "--appendonly", "no", "--dir", str(directory),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    client = redis.Redis(
        host="127.0.0.1", port=port, ssl=True, ssl_ca_certs=str(certificates.ca_file)
    )
    wait_until(client.ping, 10, f"redis-server with TLS on port {port}")
    yield port, certificates
    process.terminate()
    process.wait(10)


@pytest.fixture
def tls_env(app_env: dict[str, str], tls_redis: tuple[int, Any]) -> dict[str, str]:
    port, certificates = tls_redis
    return {
        **app_env,
        "MAILWORKER_BROKER_URL": f"rediss://127.0.0.1:{port}/0",
        "MAILWORKER_RESULT_BACKEND": f"rediss://127.0.0.1:{port}/1",
        "MAILWORKER_REDIS_CA_FILE": str(certificates.ca_file),
    }


def health_worker(env: dict[str, str], node: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [MAILWORKER, "health", "worker", "--node", node, "--timeout", "5"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_worker_runs_tasks_over_verified_tls(tls_env, start_worker):
    worker = start_worker(tls_env)
    assert celery_client(tls_env).send_task(CLEANUP).get(timeout=30) is not None
    checked = health_worker(tls_env, worker.node)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # Beat's lease and the CLI's plain clients take the same settings.
    assert redis_from_url(tls_env["MAILWORKER_BROKER_URL"], load_settings(tls_env)).ping()


@pytest.mark.parametrize("ca", ["another CA", "the system store"])
def test_a_client_without_the_ca_is_refused(tls_env, tmp_path: Path, ca: str):
    env = {**tls_env, "MAILWORKER_REDIS_CA_FILE": ""}
    if ca == "another CA":
        env["MAILWORKER_REDIS_CA_FILE"] = str(make_certificates(tmp_path).ca_file)
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        redis_from_url(env["MAILWORKER_BROKER_URL"], load_settings(env)).ping()
    checked = health_worker(env, "nobody@nowhere")
    assert checked.returncode == 3, checked.stdout + checked.stderr  # unknown: broker unreachable
    assert "certificate verify failed" in checked.stdout, checked.stdout + checked.stderr
