"""`mailworker flower url`: where operators open Flower (through the TLS proxy), and is it up."""

import socket
import urllib.error
import urllib.request

import click

from mailworker.cli.ops_context import Ops, ops_command
from mailworker.ops.errors import Unreachable


@click.group()
def flower() -> None:
    """Flower, the web monitor (served by celery-flower.service behind nginx)."""


def proxied_url(host: str, port: int, prefix: str) -> str:
    authority = host if port == 443 else f"{host}:{port}"  # noqa: PLR2004 (HTTPS default)
    path = prefix.strip("/")
    return f"https://{authority}/{path}/" if path else f"https://{authority}/"


def local_url(address: str, port: int, prefix: str) -> str:
    path = prefix.strip("/")
    return f"http://{address}:{port}/{path}/" if path else f"http://{address}:{port}/"


@flower.command()
@click.option("--host", help="Host name in the URL. Default: this host's FQDN.")
@click.option(
    "--port", type=click.IntRange(1, 65535), default=443, show_default=True, help="Proxy port."
)
@click.option("--check", is_flag=True, help="Also ask Flower's /healthcheck; exit 1 if down.")
@ops_command
def url(ops: Ops, host: str | None, port: int, check: bool) -> None:
    """Print the proxied Flower URL (basic auth; credentials: playbooks/lab-info.yml)."""
    settings = ops.settings()
    public = proxied_url(host or socket.getfqdn(), port, settings.flower_url_prefix)
    local = local_url(settings.flower_address, settings.flower_port, settings.flower_url_prefix)
    data: dict[str, object] = {"url": public, "local": local}
    if check:
        health = local + "healthcheck"
        try:
            with urllib.request.urlopen(health, timeout=ops.timeout) as reply:  # noqa: S310 (http on the local Flower)
                data["healthy"] = reply.status == 200  # noqa: PLR2004
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise Unreachable(f"Flower does not answer at {health}: {reason}") from None
    ops.emit(data, public if not check else f"{public}\nFlower is up ({local}healthcheck: OK)")
