"""TCP keepalive for the long-lived connections to Redis and PostgreSQL, chosen once for both.

A peer host that vanishes (power loss, a network partition) sends no FIN or RST: a connection
waiting on it stays open for hours (Linux sends its first probe after 2 h of silence). With these
values the kernel gives up on a silent peer after DEAD_AFTER seconds: IDLE seconds of silence,
then COUNT unanswered probes INTERVAL seconds apart; TCP_USER_TIMEOUT gives data sent but never
acknowledged the same bound. roles/postgresql applies the same values on the server side, so a
dead worker host's sessions, and the advisory locks they hold (the send lock), end within
DEAD_AFTER too, or LOCK_RELEASE_BOUND when a query of that session was running: the server
checks a running query's client every SERVER_CHECK_INTERVAL (client_connection_check_interval).
docs/reliability.md states the bound; tests/test_connection_keepalive.py measures it.
"""

from __future__ import annotations

import socket
from typing import Final

IDLE: Final = 60
INTERVAL: Final = 10
COUNT: Final = 3
DEAD_AFTER: Final = IDLE + INTERVAL * COUNT  # 90 s
# roles/postgresql's postgresql_client_connection_check_interval (a test keeps them equal).
SERVER_CHECK_INTERVAL: Final = 10
LOCK_RELEASE_BOUND: Final = DEAD_AFTER + SERVER_CHECK_INTERVAL  # 100 s


def socket_options() -> dict[int, int]:
    """setsockopt(IPPROTO_TCP, ...) values, as redis-py's `socket_keepalive_options` takes them."""
    return {socket.TCP_KEEPIDLE: IDLE, socket.TCP_KEEPINTVL: INTERVAL, socket.TCP_KEEPCNT: COUNT}


def libpq_options() -> dict[str, int]:
    """The same as libpq connection parameters (TCP_USER_TIMEOUT in milliseconds)."""
    return {
        "keepalives": 1,
        "keepalives_idle": IDLE,
        "keepalives_interval": INTERVAL,
        "keepalives_count": COUNT,
        "tcp_user_timeout": DEAD_AFTER * 1000,
    }
