"""Read the deployed systemd EnvironmentFile so host commands see what the services see.

Parsing follows systemd's EnvironmentFile rules closely enough for the files the roles write:
`KEY=VALUE` lines, `#`/`;` comments, optional single or double quotes, backslash line
continuation. Values are never echoed in errors: the file holds secrets.
"""

import os
import re
import sys
from collections.abc import MutableMapping
from pathlib import Path

from mailworker.ops.errors import BadInput, OpsError

DEFAULT_ENV_FILE = Path("/etc/mailworker/mailworker.env")
# When the environment already names a broker, the operator chose it: no implicit file.
MARKER_VARIABLE = "MAILWORKER_BROKER_URL"

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DOUBLE_QUOTE_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\", '"': '"', "$": "$", "`": "`"}


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Join backslash-continued lines, keeping the number of each logical line's first line."""
    lines: list[tuple[int, str]] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        if not pending:
            start = number
        if raw.endswith("\\") and not raw.endswith("\\\\"):
            pending.append(raw[:-1])
            continue
        pending.append(raw)
        lines.append((start, "".join(pending)))
        pending = []
    if pending:
        lines.append((start, "".join(pending)))
    return lines


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == "'":  # noqa: PLR2004 (a pair of quotes)
        return value[1:-1]
    if len(value) >= 2 and value[0] == value[-1] == '"':  # noqa: PLR2004
        inner = value[1:-1]
        return re.sub(r"\\(.)", lambda m: _DOUBLE_QUOTE_ESCAPES.get(m[1], "\\" + m[1]), inner)
    return value


def parse_env_file(text: str, source: str = "environment file") -> dict[str, str]:
    """Return the variables a systemd EnvironmentFile defines; a malformed line names its number."""
    variables: dict[str, str] = {}
    for number, line in _logical_lines(text):
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        key, sep, value = stripped.partition("=")
        key = key.strip()
        if not sep or not _KEY.fullmatch(key):
            raise BadInput(f"{source}: line {number} is not KEY=VALUE")
        variables[key] = _unquote(value.strip())
    return variables


def load_env_file(path: Path, environ: MutableMapping[str, str], *, override: bool) -> None:
    """Copy the file's variables into environ; an explicit file wins over the environment.

    `-` is standard input: how root hands the service user a secret without a file it could read.
    """
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
    except PermissionError:
        raise OpsError(
            f"cannot read {path}: permission denied (run as root or celeryworker)"
        ) from None
    except FileNotFoundError:
        raise BadInput(f"environment file {path} does not exist") from None
    except OSError as exc:
        raise OpsError(f"cannot read {path}: {exc.strerror}") from None
    for key, value in parse_env_file(text, source=str(path)).items():
        if override or key not in environ:
            environ[key] = value


def apply_env_file(
    explicit: Path | None,
    environ: MutableMapping[str, str] | None = None,
    default: Path = DEFAULT_ENV_FILE,
) -> Path | None:
    """Load the explicit file, or the deployed default when the environment names no broker.

    Returns the file that was read, or None when none was.
    """
    env = os.environ if environ is None else environ
    if explicit is not None:
        load_env_file(explicit, env, override=True)
        return explicit
    if MARKER_VARIABLE not in env and default.exists():
        load_env_file(default, env, override=False)
        return default
    return None
