"""Celery's remote control (inspect, ping, revoke) with the command's timeout and node filter.

A broadcast waits the whole timeout for replies unless it knows how many to expect; when the
operator names nodes, `limit` lets it return as soon as all of them have answered.
"""

import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from celery import Celery

from mailworker.ops.broker import CONNECTION_ERRORS, describe_failure, open_broker


@dataclass(frozen=True)
class Target:
    """Which workers a command talks to: all, the named nodes, or the nodes of one host."""

    nodes: tuple[str, ...] = ()
    host: str | None = None

    @classmethod
    def this_host(cls) -> "Target":
        return cls(host=socket.gethostname())

    def keep(self, node: str) -> bool:
        if self.nodes and node not in self.nodes:
            return False
        return self.host is None or node.partition("@")[2] == self.host

    def describe(self) -> str:
        if self.nodes:
            return ", ".join(self.nodes)
        if self.host:
            return f"workers on {self.host}"
        return "any worker"


def broadcast(
    app: Celery,
    command: str,
    target: Target,
    timeout: float,
    arguments: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """node -> reply for every targeted worker that answered within the timeout."""
    destination = list(target.nodes) or None
    with open_broker(app):  # one bounded PING: a broadcast to a dead broker retries for seconds
        pass
    try:
        replies = app.control.broadcast(
            command,
            arguments=arguments or {},
            destination=destination,
            reply=True,
            timeout=timeout,
            limit=len(destination) if destination else None,
        )
    except CONNECTION_ERRORS as exc:
        raise describe_failure("broker", str(app.conf.broker_url), exc) from None
    merged: dict[str, Any] = {}
    for reply in replies or []:
        for node, value in reply.items():
            if target.keep(node):
                merged[node] = value
    return dict(sorted(merged.items()))


def ping(app: Celery, target: Target, timeout: float) -> dict[str, Any]:
    return broadcast(app, "ping", target, timeout)


def inspect(app: Celery, what: str, target: Target, timeout: float) -> dict[str, Any]:
    """One of Celery's inspect commands (active, reserved, scheduled, registered, stats...)."""
    arguments: dict[str, Any] = {"taskinfoitems": []} if what == "registered" else {}
    return broadcast(app, what, target, timeout, arguments)


def query_task(app: Celery, task_id: str, target: Target, timeout: float) -> dict[str, Any]:
    """node -> {"state": active|reserved|scheduled, "info": request info} for workers holding it."""
    found: dict[str, Any] = {}
    for node, reply in broadcast(app, "query_task", target, timeout, {"ids": [task_id]}).items():
        if isinstance(reply, dict) and task_id in reply:
            state, info = reply[task_id]
            found[node] = {"state": state, "info": info}
    return found


def revoke(
    app: Celery,
    task_ids: Sequence[str],
    target: Target,
    timeout: float,
    *,
    terminate: bool,
    signal: str,
) -> dict[str, Any]:
    """node -> the worker's answer ({"ok": "tasks ... flagged as revoked"})."""
    arguments = {"task_id": list(task_ids), "terminate": terminate, "signal": signal}
    return broadcast(app, "revoke", target, timeout, arguments)
