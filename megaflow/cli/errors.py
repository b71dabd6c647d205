"""One place that turns every exception the CLI meets into one line on stderr and an exit status.

``run(app, argv)`` calls the Typer app with ``standalone_mode=False`` so that usage errors,
MegaFlow errors, unreachable services (Redis, Docker, HTTP, MongoDB, S3), file errors and bad
settings all come here. ``--debug`` / ``MEGAFLOW_DEBUG=1`` prints the traceback before the line.
"""

from __future__ import annotations

import re
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from megaflow.cli.base import (
    EXIT_BROKEN_PIPE,
    EXIT_INFRA,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_TIMEOUT,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    State,
)
from megaflow.core import errors as mf


def _safe_url(url: str) -> str:
    return re.sub(r"//[^@/]*@", "//***@", url)


def _setting(name: str, default: str = "") -> str:
    import os

    value = getattr(State.settings, name, None) if State.settings is not None else None
    return _safe_url(str(value or os.environ.get(f"MEGAFLOW_{name.upper()}") or default))


def _first_line(exc: BaseException) -> str:
    """The exception's message on one line, without a trailing full stop (a '; what to do' follows)."""
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split()).rstrip(".")


def _module(exc: BaseException) -> str:
    return type(exc).__module__.split(".")[0]


def _names(exc: BaseException) -> set[str]:
    return {c.__name__ for c in type(exc).__mro__}


def _settings_error(exc: Any) -> str:
    """A pydantic ValidationError of Settings as 'setting MEGAFLOW_X=...: why; fix'."""
    errs = exc.errors()
    first = errs[0]
    field = ".".join(str(p) for p in first.get("loc", ())) or "(settings)"
    value = first.get("input")
    shown = "" if isinstance(value, dict) or value is None else f"={value!r}"
    if shown and any(word in field.lower() for word in ("password", "key", "secret", "token")):
        shown = "=***"
    more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
    msg = first.get("msg", "invalid").removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        msg = "unknown setting"
    if exc.title != "Settings":
        return f"invalid {exc.title}: field '{field}'{shown}: {msg}{more}; fix the input"
    return f"setting MEGAFLOW_{field.upper()}{shown}: {msg}{more}; fix the environment variable or MEGAFLOW_CONFIG"


def classify(exc: BaseException) -> tuple[int, str]:
    """(exit status, one-line message naming what is wrong and what to do) for any exception."""
    names, module = _names(exc), _module(exc)
    # usage errors of the command line itself
    if "UsageError" in names:
        ctx = getattr(exc, "ctx", None)
        where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        if "NoArgsIsHelpError" in names and ctx is not None:
            cmds = sorted(getattr(ctx.command, "commands", {}) or {})
            return EXIT_USAGE, "missing command" + (f"; choose one of: {', '.join(cmds)}" if cmds else "") + where
        text = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        text = " ".join(text.replace("Value error, ", "").split()).rstrip(".")
        return EXIT_USAGE, (text or "bad usage") + where
    if "ValidationError" in names and module.startswith("pydantic"):
        return EXIT_USAGE, _settings_error(exc)
    # MegaFlow's own errors, most specific first
    if isinstance(exc, mf.ServiceUnavailableError):
        return EXIT_UNREACHABLE, _first_line(exc)
    if isinstance(exc, mf.ModelUnavailableError):
        return EXIT_UNREACHABLE, f"{_first_line(exc)}; check the model endpoints (`megaflow model endpoints`)"
    if isinstance(exc, (mf.SpecError, mf.ConfigError, mf.QuotaError, mf.NotFoundError)):
        return EXIT_USAGE, _first_line(exc)
    if isinstance(exc, mf.InfraError):
        return EXIT_INFRA, _first_line(exc)
    if isinstance(exc, mf.MegaflowError):
        return EXIT_INFRA, _first_line(exc)
    if isinstance(exc, UnicodeDecodeError):
        return EXIT_USAGE, f"a file is not UTF-8 text ({_first_line(exc)}); give a UTF-8 JSONL or YAML file"
    if module == "yaml" and "YAMLError" in names:
        import os

        config = os.environ.get("MEGAFLOW_CONFIG", "a YAML file")
        return EXIT_USAGE, f"{config}: not valid YAML ({_first_line(exc)}); fix the file"
    unreachable = _unreachable(exc, names, module)
    if unreachable:
        return EXIT_UNREACHABLE, unreachable
    if module == "redis":
        return EXIT_INFRA, f"Redis refused the request: {_first_line(exc)}; check the server (memory, replica, ACLs)"
    if module == "docker":
        if "NotFound" in names:
            return EXIT_USAGE, f"Docker: {_first_line(exc)}; check the image or container name"
        return EXIT_INFRA, f"Docker engine error: {_first_line(exc)}"
    if isinstance(exc, TimeoutError):
        return EXIT_TIMEOUT, f"{_first_line(exc)}; the batch keeps running: follow it with `megaflow status`"
    if isinstance(exc, OSError):
        return EXIT_USAGE, _file_error(exc)
    if isinstance(exc, (KeyboardInterrupt,)):
        return EXIT_INTERRUPTED, "interrupted"
    return EXIT_INTERNAL, (
        f"internal error: {type(exc).__name__}: {_first_line(exc)}; rerun with --debug "
        "(or MEGAFLOW_DEBUG=1) and report the traceback"
    )


def _unreachable(exc: BaseException, names: set[str], module: str) -> str | None:
    """The message for a service that cannot be reached, or None when ``exc`` is something else."""
    if module == "redis" and names & {"ConnectionError", "TimeoutError", "AuthenticationError", "BusyLoadingError"}:
        hint = (
            "check the password in the URL"
            if "AuthenticationError" in names
            else "start Redis (`make demo` does) or fix the URL"
        )
        return (
            f"cannot reach Redis at MEGAFLOW_REDIS_URL ({_setting('redis_url', 'redis://127.0.0.1:6379/0')}): "
            f"{_first_line(exc)}; {hint}"
        )
    if module == "kombu" and "OperationalError" in names:
        return (
            f"cannot reach the Celery broker (MEGAFLOW_REDIS_URL={_setting('redis_url')}): {_first_line(exc)}; "
            "start Redis or fix the URL"
        )
    if module == "docker" and "DockerException" in names and "APIError" not in names:
        return (
            f"no Docker engine reachable (DOCKER_HOST or /var/run/docker.sock): {_first_line(exc)}; "
            "start dockerd or set DOCKER_HOST"
        )
    if module == "pymongo" and names & {"ConnectionFailure", "ServerSelectionTimeoutError"}:
        return (
            f"cannot reach the metadata store (MEGAFLOW_METADATA_URL={_setting('metadata_url')}): "
            f"{_first_line(exc)[:200]}; start MongoDB or fix the URL"
        )
    if module == "botocore" and names & {"EndpointConnectionError", "NoCredentialsError", "ConnectionError"}:
        return (
            f"cannot reach the artifact store (MEGAFLOW_ARTIFACTS_URL={_setting('artifacts_url')}): "
            f"{_first_line(exc)}; check MEGAFLOW_S3_ENDPOINT_URL and the credentials"
        )
    if module in ("httpx", "httpcore", "requests", "urllib3") and names & {
        "ConnectError",
        "ConnectTimeout",
        "ConnectionError",
        "NewConnectionError",
        "ReadTimeout",
    }:
        return (
            f"cannot reach {getattr(getattr(exc, 'request', None), 'url', 'a model endpoint')}: "
            f"{_first_line(exc)}; check that the server runs and the URL"
        )
    if isinstance(exc, ConnectionError):
        return f"a service refused the connection: {_first_line(exc)}; check that it runs and its URL"
    return None


def _file_error(exc: OSError) -> str:
    path = exc.filename or ""
    why = exc.strerror or _first_line(exc)
    fixes = {
        "FileNotFoundError": "check the path (its directory must exist)",
        "IsADirectoryError": "give a file path, not a directory",
        "NotADirectoryError": "a part of the path is a file; give a directory",
        "FileExistsError": "a file is in the way; remove it or pick another path",
        "PermissionError": "pick a path you may write, or fix its permissions",
    }
    fix = fixes.get(type(exc).__name__, "check the path")
    return f"{path}: {why}; {fix}" if path else f"{why}; {fix}"


def report(exc: BaseException) -> int:
    """Print ``exc`` as one line on stderr (traceback first under --debug); return its exit status."""
    code, message = classify(exc)
    if "NoArgsIsHelpError" in _names(exc) and getattr(exc, "ctx", None) is not None:
        sys.stdout.write(exc.ctx.get_help() + "\n")  # type: ignore[attr-defined]  # `megaflow` alone: the help, then the one error line
    if State.debug and not (code == EXIT_USAGE and "UsageError" in _names(exc)):
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    return code


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not complain about the closed pipe."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def run(app: Any, argv: Sequence[str] | None = None) -> int:
    """Run the Typer app on ``argv``; return the exit status (never raises, except SystemExit)."""
    try:
        rv = app(args=list(argv) if argv is not None else None, prog_name="megaflow", standalone_mode=False)
    except SystemExit as exc:
        if type(sys.stdout).__name__ == "PacifyFlushWrapper":  # click met EPIPE on stdout and exits 1 for it
            _silence_stdout()
            return EXIT_BROKEN_PIPE
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USAGE)
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader went away (`megaflow status --jsonl | head -1`): stop quietly
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except BaseException as exc:  # noqa: BLE001 - the single place errors become exit statuses
        if "Abort" in _names(exc):
            sys.stderr.write("error: aborted\n")
            return EXIT_INTERRUPTED
        return report(exc)
    return rv if isinstance(rv, int) else 0
