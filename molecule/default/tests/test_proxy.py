"""The nginx proxy in front of Flower, as an operator checks it from the Flower host.

TLS only (Mozilla intermediate), basic auth on everything including /flower/metrics, Flower's own
credentials passed upstream, a rate limit. A failing test prints the journals of nginx and Flower
(the `units` marker, see conftest.py); failed requests also show nginx's error log.
"""

import os
import re
import shlex
import stat
from pathlib import Path

import pytest
import testinfra.utils.ansible_runner
from conftest import eventually
from passlib.hash import sha512_crypt

testinfra_hosts = testinfra.utils.ansible_runner.AnsibleRunner(
    os.environ["MOLECULE_INVENTORY_FILE"]
).get_hosts("flower")

pytestmark = pytest.mark.units("nginx", "celery-flower")

HTTPS = "https://127.0.0.1"
CREDENTIALS = Path(os.environ["MOLECULE_INVENTORY_FILE"]).parent / ".credentials"
USER = "flower"


@pytest.fixture(scope="module")
def password() -> str:
    return (CREDENTIALS / f"flower-proxy-{USER}.password").read_text().strip()


@pytest.fixture(scope="module", autouse=True)
def _flower_answers(host):
    # An earlier checklist may have restarted Flower a moment ago.
    healthy = "curl --silent --fail --max-time 5 http://127.0.0.1:5555/flower/healthcheck"
    assert eventually(lambda: host.run(healthy).rc == 0, timeout=60), "Flower does not answer"


def logs(host) -> str:
    errors = host.run("tail -n 30 /var/log/nginx/error.log").stdout
    return f"\n--- /var/log/nginx/error.log ---\n{errors}"


def curl(host, *args: str):
    return host.run("curl --silent --show-error --max-time 10 --insecure " + shlex.join(args))


def status(host, url: str, *args: str) -> int:
    result = curl(host, "--output", "/dev/null", "--write-out", "%{http_code}", *args, url)
    assert result.rc == 0, result.stderr + logs(host)
    return int(result.stdout)


def handshake(host, *args: str):
    """An openssl handshake with the proxy; rc 0 when it succeeded."""
    return host.run(
        "timeout 10 openssl s_client -connect 127.0.0.1:443 -servername localhost "
        + shlex.join(args)
        + " </dev/null"
    )


def test_nginx_is_enabled_and_running(host):
    nginx = host.service("nginx")
    assert nginx.is_enabled
    assert nginx.is_running


def test_nginx_runs_sandboxed(host):
    # Debian's own nginx.service scores 9.6; the role's drop-in brings it to about 2.5.
    report = host.run("systemd-analyze security --no-pager nginx.service").stdout
    score = re.search(r"Overall exposure level for \S+: ([0-9.]+)", report)
    assert score, report
    assert float(score.group(1)) <= 3.0, report


@pytest.mark.parametrize(
    "path", ["/flower/", "/flower/metrics", "/flower/healthcheck", "/flower/api/workers"]
)
def test_without_credentials_nginx_answers_401(host, path):
    assert status(host, HTTPS + path) == 401, logs(host)


def test_a_wrong_password_gets_401(host):
    assert status(host, HTTPS + "/flower/", "--user", f"{USER}:not-the-password") == 401


@pytest.mark.parametrize("path", ["/flower/", "/flower/workers", "/flower/api/workers"])
def test_with_credentials_flower_answers_200(host, password, path):
    assert status(host, HTTPS + path, "--user", f"{USER}:{password}") == 200, logs(host)


def test_nginx_presents_flowers_own_credentials_from_a_root_only_file(host):
    # Flower refuses its pages and API without its own credentials (401, test_flower.py); the
    # 200s above come through because nginx replaces the operator's header with these.
    include = host.file("/etc/nginx/flower-proxy-upstream-auth.conf")
    assert (include.user, include.group, include.mode) == ("root", "root", 0o600)
    assert 'proxy_set_header Authorization "Basic ' in include.content_string


def test_metrics_come_with_credentials(host, password):
    result = curl(host, "--fail", "--user", f"{USER}:{password}", HTTPS + "/flower/metrics")
    assert result.rc == 0, result.stderr + logs(host)
    assert "flower_" in result.stdout


def test_plain_http_only_redirects_to_https(host):
    result = curl(
        host,
        "--output",
        "/dev/null",
        "--write-out",
        "%{http_code} %{redirect_url}",
        "http://127.0.0.1/flower/",
    )
    code, location = result.stdout.split()
    assert code == "301"
    assert location == "https://127.0.0.1/flower/"


def test_the_root_redirects_to_flower_keeping_the_port_the_browser_used(host, password):
    # A relative Location: an absolute one would name nginx's listen port, not a forwarded one.
    result = curl(
        host,
        "--output",
        "/dev/null",
        "--write-out",
        "%{http_code} %header{location}",
        "--user",
        f"{USER}:{password}",
        HTTPS + "/",
    )
    assert result.rc == 0, result.stderr + logs(host)
    assert result.stdout.split() == ["302", "/flower/"]


def test_plain_http_on_the_tls_port_is_refused(host):
    assert status(host, "http://127.0.0.1:443/flower/") == 400


@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
def test_tls_1_2_and_1_3_are_accepted(host, version):
    result = handshake(host, version)
    assert result.rc == 0, result.stdout + result.stderr


@pytest.mark.parametrize("version", ["-tls1", "-tls1_1"])
def test_tls_1_0_and_1_1_are_refused(host, version):
    # SECLEVEL=0 lets the client offer the old versions: a refusal is the server's.
    result = handshake(host, version, "-cipher", "DEFAULT:@SECLEVEL=0")
    assert result.rc != 0, result.stdout


def test_only_aead_ciphers_are_accepted_on_tls_1_2(host):
    assert handshake(host, "-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256").rc == 0
    weak = handshake(host, "-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384")
    assert weak.rc != 0, weak.stdout


def test_no_session_tickets(host):
    result = handshake(host, "-tls1_2")
    assert result.rc == 0, result.stderr
    assert "TLS session ticket:" not in result.stdout, result.stdout


def test_hsts_and_security_headers(host, password):
    headers = curl(
        host, "--head", "--user", f"{USER}:{password}", HTTPS + "/flower/"
    ).stdout.lower()
    assert "strict-transport-security: max-age=63072000" in headers, headers
    assert "x-content-type-options: nosniff" in headers, headers
    assert "x-frame-options: deny" in headers, headers


def test_self_signed_certificate_names_the_host(host):
    certificate = host.file("/etc/nginx/tls/flower-proxy.crt")
    key = host.file("/etc/nginx/tls/flower-proxy.key")
    assert (certificate.user, certificate.mode) == ("root", 0o644)
    assert (key.user, key.mode) == ("root", 0o600)
    names = host.check_output("openssl x509 -noout -ext subjectAltName -in " + certificate.path)
    assert "DNS:localhost" in names
    assert "IP Address:127.0.0.1" in names


def test_htpasswd_is_sha512_crypt_of_the_password_and_readable_by_nginx_only(host, password):
    # SHA-512 crypt at 5000 rounds, not bcrypt: nginx hashes the password on every request.
    htpasswd = host.file("/etc/nginx/flower-proxy.htpasswd")
    assert (htpasswd.user, htpasswd.group, htpasswd.mode) == ("root", "www-data", 0o640)
    user, _, entry = htpasswd.content_string.strip().partition(":")
    assert user == USER, htpasswd.content_string.splitlines()[0].split(":")[0]
    assert entry.startswith("$6$"), "not SHA-512 crypt"
    assert "rounds=" not in entry, "not the default 5000 rounds"
    assert sha512_crypt.verify(password, entry), "the entry does not match the password"


def test_generated_password_is_private_on_the_controller(password):
    assert len(password) >= 32
    assert stat.S_IMODE(CREDENTIALS.stat().st_mode) == 0o700
    for file in CREDENTIALS.iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o600, file


def test_rate_limit_answers_429(host):
    # 100 requests on one connection, faster than 10 r/s with a burst of 40.
    requests = ["--output", "/dev/null", HTTPS + "/flower/healthcheck"] * 100
    result = curl(host, "--write-out", "%{http_code}\\n", *requests)
    codes = result.stdout.split()
    assert len(codes) == 100, result.stderr
    assert "429" in codes, codes
    assert "401" in codes, codes
