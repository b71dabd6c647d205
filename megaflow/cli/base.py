"""What every ``megaflow`` sub-command shares: exit statuses, the Typer app class, consoles, settings.

Sub-command modules build their apps with ``App(...)`` (plain help text, usage lines such as
``megaflow worker [OPTIONS] ROLE``) and never print errors themselves: they raise, and
``megaflow.cli.errors.run`` turns the exception into one line on stderr and an exit status.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from typing import Any

import typer
from rich.console import Console
from typer.core import TyperCommand

from megaflow.core import states

# --- exit statuses (documented in the README, section "Exit statuses") -----------------------
EXIT_OK = 0  # done; every episode ended as expected
EXIT_INTERNAL = 1  # a bug in MegaFlow: rerun with --debug and report the traceback
EXIT_USAGE = 2  # bad input: arguments, a task/spec file, a setting, an unknown batch/host/episode id
EXIT_EPISODES_FAILED = 3  # the batch ran, but some episodes FAILED, TIMED_OUT or were CANCELLED
EXIT_INFRA = 4  # infrastructure failed: episodes ended with cause "infra", a host or image broke
EXIT_UNREACHABLE = 5  # a service cannot be reached: Redis, Docker, a model endpoint, a store
EXIT_TIMEOUT = 6  # --timeout ran out before the batch finished (it keeps running)
EXIT_INTERRUPTED = 130  # Ctrl-C
EXIT_BROKEN_PIPE = 141  # the reader of stdout went away (`| head`), as a process killed by SIGPIPE reports

EXIT_STATUSES = {
    EXIT_OK: "success: every episode ended as expected",
    EXIT_INTERNAL: "internal error (a bug): rerun with --debug and report the traceback",
    EXIT_USAGE: "bad input: arguments, task file, settings, unknown batch/host/episode id",
    EXIT_EPISODES_FAILED: "some episodes FAILED, TIMED_OUT or were CANCELLED",
    EXIT_INFRA: "infrastructure failure (episodes with cause 'infra', a broken host or image)",
    EXIT_UNREACHABLE: "a service is unreachable (Redis, Docker, model endpoint, metadata/artifact store)",
    EXIT_TIMEOUT: "--timeout ran out before the batch finished",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
    EXIT_BROKEN_PIPE: "stdout was closed early (`| head`); nothing more is printed",
}


def outcome_status(results: Iterable[dict[str, Any]]) -> int:
    """The exit status a batch's results call for: infra beats task failures beats success."""
    infra = failed = False
    for r in results:
        if r.get("state") in states.TERMINAL and r.get("cause") == states.CAUSE_INFRA:
            infra = True
        elif r.get("state") != states.SUCCEEDED:
            failed = True
    return EXIT_INFRA if infra else EXIT_EPISODES_FAILED if failed else EXIT_OK


class State:
    """Process-wide CLI state: the --debug flag and the settings once loaded (errors name the URLs)."""

    debug: bool = os.environ.get("MEGAFLOW_DEBUG", "").lower() in ("1", "true", "yes", "on")
    settings: Any = None


def load_settings() -> Any:
    """Settings from the environment (a bad value raises ValidationError); kept so errors can name the URLs."""
    from megaflow.core.errors import ConfigError
    from megaflow.core.settings import Settings

    config = os.environ.get("MEGAFLOW_CONFIG")
    if config and not os.path.isfile(config):
        raise ConfigError(f"MEGAFLOW_CONFIG={config}: no such file; point it at a YAML settings file or unset it")
    State.settings = Settings.load()
    return State.settings


def check_user(name: str, param: str = "USER") -> str:
    """A user name as the Client accepts it (core.guards.USER_NAME), or a usage error naming the parameter."""
    from megaflow.core import guards

    if not guards.USER_NAME.fullmatch(name):
        raise typer.BadParameter("must be " + guards.USER_RULE, param_hint=param)
    return name


class Command(TyperCommand):
    """A Typer command whose usage line reads ``megaflow submit [OPTIONS] FILE`` (no braces)."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return [p.replace("{", "").replace("}", "") for p in super().collect_usage_pieces(ctx)]


class App(typer.Typer):
    """typer.Typer with MegaFlow's defaults: plain help, no completion, errors left to the runner."""

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("no_args_is_help", True)
        kwargs.setdefault("add_completion", False)
        kwargs.setdefault("pretty_exceptions_enable", False)
        kwargs.setdefault("rich_markup_mode", None)
        super().__init__(**kwargs)

    def command(self, *args: Any, cls: Any = None, **kwargs: Any) -> Any:
        return super().command(*args, cls=cls or Command, **kwargs)


# --- output ---------------------------------------------------------------------------------
def console(*, stderr: bool = False) -> Console:
    """A console that never folds ids: on a terminal its width, when piped one long line per row."""
    stream = sys.stderr if stderr else sys.stdout
    terminal = stream.isatty()
    return Console(
        file=stream, stderr=stderr, width=None if terminal else 1000, soft_wrap=not terminal, highlight=False
    )


def echo_json(data: Any) -> None:
    """One JSON document on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def echo_jsonl(rows: Iterable[Any]) -> None:
    """One JSON object a line on stdout."""
    for row in rows:
        sys.stdout.write(json.dumps(row, default=str) + "\n")
    sys.stdout.flush()


def output_format(as_json: bool, as_jsonl: bool) -> str:
    """'json', 'jsonl' or 'table'; both flags at once is a usage error."""
    if as_json and as_jsonl:
        raise typer.BadParameter("give --json or --jsonl, not both", param_hint="--json / --jsonl")
    return "json" if as_json else "jsonl" if as_jsonl else "table"


JSON_HELP = "Print one JSON document (for scripts)."
JSONL_HELP = "Print one JSON object a line (for scripts)."
