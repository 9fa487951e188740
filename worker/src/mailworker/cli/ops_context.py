"""What every ops command shares: --env-file, --timeout, --json, the app, and error handling.

Errors the operator can act on (OpsError and its kinds, a configuration error, a broker that
does not answer) become one line on stderr and a meaningful exit code, never a traceback.
"""

import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from celery import Celery
from celery.utils.nodenames import host_format

from mailworker.celery_config import build_config
from mailworker.errors import ConfigurationError
from mailworker.ops.broker import CONNECTION_ERRORS, Broker, describe_failure, make_fast_failing
from mailworker.ops.broker import open_broker as _open_broker
from mailworker.ops.envfile import DEFAULT_ENV_FILE, apply_env_file
from mailworker.ops.errors import EXIT_UNHEALTHY, OpsError
from mailworker.ops.workers import Target
from mailworker.settings import Settings, load_settings

DEFAULT_TIMEOUT = 3.0
EXIT_INTERRUPTED = 130


@dataclass
class Ops:
    """One ops command's options plus lazily loaded settings and Celery app."""

    as_json: bool
    timeout: float
    env_file: Path | None
    _settings: Settings | None = field(default=None, repr=False)
    _app: Celery | None = field(default=None, repr=False)

    def settings(self) -> Settings:
        """MAILWORKER_* settings (env file included); ConfigurationError names a bad one."""
        if self._settings is None:
            self._settings = load_settings()
        return self._settings

    @property
    def app(self) -> Celery:
        """A Celery app with the deployed configuration that fails fast on the broker.

        Built for this command alone (not the module-level `mailworker.celery_app.app`), so
        the short timeouts never leak into anything else running in the same process.
        """
        if self._app is None:
            app = Celery("mailworker", set_as_current=False)
            app.conf.update(build_config(self.settings()))
            make_fast_failing(app, self.timeout)
            self._app = app
        return self._app

    def close(self) -> None:
        if self._app is not None:
            self._app.close()

    @contextmanager
    def broker(self) -> Iterator[Broker]:
        with _open_broker(self.app) as broker:
            yield broker

    def emit(self, data: Any, human: str) -> None:
        from mailworker.cli.output import emit  # noqa: PLC0415

        emit(self.as_json, data, human)


def fail(message: str, code: int = EXIT_UNHEALTHY) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def ops_command(func: Callable[..., None]) -> Callable[..., None]:
    """Add --env-file/--timeout/--json, pass an `Ops` first, and turn errors into one line."""

    @functools.wraps(func)
    def run(
        *args: Any, env_file: Path | None, timeout: float, as_json: bool, **kwargs: Any
    ) -> None:
        ops = Ops(as_json=as_json, timeout=timeout, env_file=env_file)
        try:
            # Before anything reads MAILWORKER_*: the env file fills os.environ for all of it.
            apply_env_file(ops.env_file)
            func(ops, *args, **kwargs)
        except OpsError as exc:
            fail(str(exc), exc.exit_code)
        except ConfigurationError as exc:
            fail(f"configuration: {exc}")
        except CONNECTION_ERRORS as exc:
            url = str(ops._app.conf.broker_url) if ops._app is not None else "(unknown)"
            fail(str(describe_failure("broker", url, exc)))
        except OSError as exc:  # a file the command reads or cleans
            where = f" {exc.filename}" if exc.filename else ""
            fail(f"cannot access{where}: {exc.strerror or exc}")
        except KeyboardInterrupt:
            fail("interrupted", EXIT_INTERRUPTED)
        finally:
            ops.close()

    options = [
        click.option(
            "--env-file",
            type=click.Path(dir_okay=False, path_type=Path),
            envvar="MAILWORKER_ENV_FILE",
            default=None,
            help=f"Read MAILWORKER_* settings from this systemd EnvironmentFile. Default: "
            f"{DEFAULT_ENV_FILE} when it exists and MAILWORKER_BROKER_URL is not set.",
        ),
        click.option(
            "--timeout",
            type=click.FloatRange(min=0.1, max=300),
            default=DEFAULT_TIMEOUT,
            show_default=True,
            help="Seconds to wait for Redis and for workers' replies.",
        ),
        click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts."),
    ]
    for option in reversed(options):
        run = option(run)
    return run


def target_options(func: Callable[..., None]) -> Callable[..., None]:
    """Add --node (repeatable) and --this-host; pass a `Target` as `target`."""

    @functools.wraps(func)
    def run(*args: Any, node: tuple[str, ...], this_host: bool, **kwargs: Any) -> None:
        if node and this_host:
            raise click.UsageError("give either --node or --this-host, not both")
        nodes = tuple(host_format(n) for n in node)  # %h, as in MAILWORKER_NODE_NAME
        target = Target.this_host() if this_host else Target(nodes=nodes)
        func(*args, target=target, **kwargs)

    run = click.option(
        "--this-host", is_flag=True, help="Only the worker nodes running on this host."
    )(run)
    return click.option(
        "--node",
        "-n",
        multiple=True,
        metavar="NAME@HOST",
        help="Only this worker node (repeatable; %h = this host). Default: every worker.",
    )(run)
