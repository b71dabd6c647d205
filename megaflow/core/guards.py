"""Input guards shared by the settings and the task spec (issue 17, bad input).

Pure checks for values that travel into queue names, Redis keys, Docker labels, container paths and
JSON: safe names and ids, container paths, image references, environment names, JSON shape (depth,
finite numbers, valid Unicode) and numeric bounds. Each raises ValueError saying what is allowed;
pydantic turns that into a field error, and the callers turn field errors into one MegaflowError.
"""

from __future__ import annotations

import math
import posixpath
import re
import unicodedata
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

DAY = 86400.0
MAX_DEPTH = 32  # nesting of JSON values a spec may carry (metadata, model options)
MAX_NODES = 1_000_000  # values in one spec, counted before validation
MAX_PATH = 4096
MAX_INT = 2**63 - 1  # what MongoDB, SQLite and Redis counters can hold

# fullmatch only: ``$`` would let a trailing newline through
USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")  # submitters (fullmatch)
USER_RULE = "1-64 characters of letters, digits, '_', '.', '@' or '-', starting with a letter or digit"
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")  # host names: queue env.<name>, Docker label
KEY_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")  # no glob characters: SCAN and ACL patterns use it
TASK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@+=#-]{0,199}")
BATCH_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # episode ids are <batch>-<index>
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
TASK_ID_RULE = "1-200 characters of letters, digits and . _ - : @ + = # (starting with a letter or digit)"
BATCH_ID_RULE = "1-128 characters of letters, digits, '.', '_' or '-' (starting with a letter or digit)"
NAME_RULE = "1-63 characters of letters, digits, '.', '_' or '-' (starting with a letter or digit)"

# Docker reference grammar (distribution/reference): [domain[:port]/]path[:tag][@digest]
_ALNUM = r"[a-z0-9]+"
_PATH_COMP = rf"{_ALNUM}(?:(?:[._]|__|-+){_ALNUM})*"
_DOMAIN_COMP = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_COMP}(?:\.{_DOMAIN_COMP})*|\[[0-9a-fA-F:]+\])(?::[0-9]{{1,5}})?"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
IMAGE_REF = re.compile(rf"(?:{_DOMAIN}/)?{_PATH_COMP}(?:/{_PATH_COMP})*(?::{_TAG})?(?:@{_DIGEST})?")

# Variables that hook how every program in the container starts (loader, shells, interpreters):
# a spec's env applies to MegaFlow's own commands (set-up, evaluation) too, so these stay reserved.
ENV_DENY = frozenset(
    {
        "BASH_ENV",
        "ENV",
        "SHELLOPTS",
        "BASHOPTS",
        "PS4",
        "PROMPT_COMMAND",
        "IFS",
        "GLOBIGNORE",
        "PYTHONSTARTUP",
        "PYTHONINSPECT",
        "PYTHONHOME",
        "PERL5OPT",
        "PERL5DB",
        "RUBYOPT",
        "NODE_OPTIONS",
        "JAVA_TOOL_OPTIONS",
        "_JAVA_OPTIONS",
        "GCONV_PATH",
        "GLIBC_TUNABLES",
        "HOSTALIASES",
        "LOCPATH",
        "NLSPATH",
        "RESOLV_HOST_CONF",
        "MALLOC_CHECK_",
        "MALLOC_PERTURB_",
    }
)
ENV_DENY_PREFIX = ("LD_", "DYLD_", "BASH_FUNC_", "MEGAFLOW_")
DENIED_ROOTS = ("/proc", "/sys", "/dev")

_BAD_CATEGORIES = {"Cc", "Cf", "Zl", "Zp", "Cs"}  # control, format (RTL overrides), separators, surrogates


def bad_char(text: str, *, allow: str = "") -> str | None:
    """The first control, invisible-format or surrogate character of ``text`` (repr'd), else None."""
    if text.isascii() and text.isprintable():
        return None
    for ch in text:
        if ch not in allow and unicodedata.category(ch) in _BAD_CATEGORIES:
            return repr(ch)
    return None


def surrogate(text: str) -> bool:
    """A lone surrogate (from a ``\\ud800`` escape): it cannot be encoded to UTF-8 for Redis."""
    return not text.isascii() and any(0xD800 <= ord(c) <= 0xDFFF for c in text)


def show(value: Any, limit: int = 60) -> str:
    """A short repr of a bad value for a message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + "...'"


def named(value: str, pattern: re.Pattern[str], rule: str) -> str:
    """``value`` if it fully matches ``pattern``; else ValueError stating ``rule``."""
    if not pattern.fullmatch(value):
        raise ValueError(f"{show(value)} is not allowed: use {rule}")
    return value


def image_ref(value: str) -> str:
    """A Docker image reference (registry/name:tag@digest, lower-case name, at most 255 characters)."""
    if not value:
        raise ValueError("must not be empty; omit it to use the default image")
    if len(value) > 400 or len(value.split("@")[0].rsplit(":", 1)[0]) > 255:
        raise ValueError(f"image name of {len(value)} characters is too long (Docker allows 255 for the name)")
    if not IMAGE_REF.fullmatch(value):
        raise ValueError(
            f"{show(value)} is not a Docker image reference: use [registry/]name[:tag][@digest] "
            "with a lower-case name, e.g. python:3.12-slim"
        )
    return value


def container_path(value: str, what: str = "path", *, file: bool = False) -> str:
    """An absolute, plain path inside a container: no '..', control characters, /proc, /sys or /dev."""
    if not value.startswith("/"):
        raise ValueError(f"{what} {show(value)} must be absolute (start with /)")
    if len(value) > MAX_PATH:
        raise ValueError(f"{what} of {len(value)} characters is too long (at most {MAX_PATH})")
    ch = bad_char(value)
    if ch:
        raise ValueError(f"{what} {show(value)} holds the character {ch}; use printable characters only")
    parts = value.split("/")
    if ".." in parts:
        raise ValueError(f"{what} {show(value)} must not contain '..'; give the real absolute path")
    if any(len(p.encode()) > 255 for p in parts):
        raise ValueError(f"{what} {show(value)} has a name longer than 255 bytes")
    norm = posixpath.normpath(value)
    for root in DENIED_ROOTS:
        if norm == root or norm.startswith(root + "/"):
            raise ValueError(f"{what} {show(value)} is under {root}, a kernel interface; use a normal directory")
    if file and (norm == "/" or value.endswith("/")):
        raise ValueError(f"{what} {show(value)} names a directory; give a file path")
    return value


def env_var(name: str, value: str) -> None:
    """A spec's environment variable: a plain name, not a start-up hook, no NUL in the value."""
    if not ENV_NAME.fullmatch(name):
        raise ValueError(
            f"variable name {show(name)} is not allowed: use letters, digits and '_' (not starting with a digit)"
        )
    if name.upper() in ENV_DENY or name.upper().startswith(ENV_DENY_PREFIX):
        raise ValueError(
            f"{name} is reserved: it changes how every program in the container starts (or is "
            "MegaFlow's own); remove it, or set it inside a command if the task needs it"
        )
    if "\x00" in value or surrogate(value):
        raise ValueError(f"{name}'s value holds NUL or invalid Unicode; a process environment cannot carry it")
    if len(value) > 131072:
        raise ValueError(f"{name}'s value of {len(value)} characters is too long (at most 131072)")


def command(value: str, what: str = "command") -> str:
    """A shell command: no NUL (it cannot reach exec) and no lone surrogates."""
    if "\x00" in value:
        raise ValueError(f"{what} holds a NUL character, which no shell command can carry; remove it")
    return value


def bounded(value: float | None, low: float, high: float, what: str = "value") -> None:
    """A finite number within [low, high]."""
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{what} must be between {low:g} and {high:g}, got {value!r}")


def json_problem(value: Any, *, max_depth: int = MAX_DEPTH) -> tuple[tuple[Any, ...], str] | None:
    """(path, what is wrong) of the first part of ``value`` that is not plain, bounded JSON; else None.

    Walks without recursion, so a 100,000-deep or cyclic value is refused, not a RecursionError.
    """
    stack: list[tuple[Any, tuple[Any, ...]]] = [(value, ())]
    nodes = 0
    while stack:
        v, path = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            return path[:1], f"holds more than {MAX_NODES:,} values; make it smaller"
        if len(path) > max_depth:
            return path[:max_depth], f"is nested more than {max_depth} levels deep; flatten it"
        if isinstance(v, BaseModel):
            v = v.model_dump(mode="python")
        if isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, str):
                    return path, f"has a key {show(k)} that is not a string (JSON keys are strings)"
                if "\x00" in k or surrogate(k) or k.startswith("$"):
                    return path, f"has a key {show(k)} with NUL, invalid Unicode or a leading '$'; rename it"
                stack.append((x, path + (k,)))
        elif isinstance(v, (list, tuple)):
            stack.extend((x, path + (i,)) for i, x in enumerate(v))
        elif isinstance(v, str):
            if surrogate(v):
                return path, "is not valid Unicode (a lone surrogate such as \\ud800); send UTF-8 text"
        elif isinstance(v, bool) or v is None:
            pass
        elif isinstance(v, int):
            if abs(v) > MAX_INT:
                return path, "is an integer beyond 64 bits; use a smaller number or a string"
        elif isinstance(v, float):
            if not math.isfinite(v):
                return path, f"is {v!r}, not a finite number (JSON has no NaN or infinity); use a finite number"
        else:
            return path, f"is a {type(v).__name__}, not a JSON value (use strings, numbers, lists and objects)"
    return None


def field_error(loc: tuple[Any, ...], message: str, value: Any = None) -> ValidationError:
    """A pydantic error at ``loc`` (relative to the model being validated), raised from a validator."""
    err = PydanticCustomError("megaflow_guard", "{message}", {"message": message})
    return ValidationError.from_exception_data("guard", [InitErrorDetails(type=err, loc=loc, input=value)])


def dotted(path: tuple[Any, ...], limit: int = 4) -> str:
    """``a.b.0.c`` for a path, shortened after ``limit`` parts."""
    text = ".".join(str(p) for p in path[:limit])
    return text + (".…" if len(path) > limit else "")


# --- model options (a spec's ``model`` section) -------------------------------------------------
MODEL_NUMBERS: dict[str, tuple[float, float]] = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "top_k": (-1, 100_000),
    "min_p": (0.0, 1.0),
    "max_tokens": (1, 10_000_000),
    "max_completion_tokens": (1, 10_000_000),
    "seed": (-MAX_INT, MAX_INT),
    "top_logprobs": (0, 20),
    "n": (1, 128),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
    "repetition_penalty": (0.01, 10.0),
    "timeout_s": (0.001, DAY),
}


def _http_url(v: Any) -> bool:
    return isinstance(v, str) and v.startswith(("http://", "https://")) and len(v) <= 2048 and not bad_char(v)


def _text(v: Any) -> bool:
    return isinstance(v, str) and 0 < len(v) <= 200 and not bad_char(v)


# well-known model keys whatever the backend: (check, what it must be)
MODEL_TYPES: dict[str, tuple[Any, str]] = {
    "model_name": (_text, "a model name (1-200 printable characters)"),
    "endpoints": (lambda v: isinstance(v, list) and 0 < len(v) <= 100 and all(_http_url(e) for e in v),
                  "a list of http(s) base URLs, e.g. [\"http://gpu1:8000/v1\"]"),
    "base_url": (_http_url, "an http(s) base URL, e.g. http://gpu1:8000/v1"),
    "logprobs": (lambda v: isinstance(v, bool), "true or false"),
    "extra_body": (lambda v: isinstance(v, dict), "a mapping of extra request fields"),
    "stop": (lambda v: isinstance(v, str) or (isinstance(v, list) and len(v) <= 16
                                              and all(isinstance(x, str) for x in v)),
             "a string or a list of at most 16 strings"),
    "policy_version": (_text, "a version tag (1-200 printable characters)"),
}  # fmt: skip


def model_options(options: dict[str, Any]) -> None:
    """Sampling numbers of a model section within their documented ranges; every value plain JSON."""
    for key in sorted(options):
        value = options[key]
        if key in MODEL_TYPES and value is not None:
            check, what = MODEL_TYPES[key]
            if not check(value):
                raise field_error((key,), f"must be {what}, got {show(value)}", value)
        if key in MODEL_NUMBERS and value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise field_error((key,), f"must be a number, got {type(value).__name__}", value)
            low, high = MODEL_NUMBERS[key]
            try:
                bounded(value, low, high, key)
            except ValueError as exc:
                raise field_error((key,), str(exc), value) from None
        problem = json_problem(value, max_depth=MAX_DEPTH - 2)
        if problem:
            path, what = problem
            raise field_error((key, *path[:3]), f"{dotted((key, *path))} {what}", None)


# --- task spec limits ---------------------------------------------------------------------------
SPEC_BOUNDS: dict[str, tuple[float, float]] = {
    "max_steps": (1, 10_000),
    "max_tokens": (1, 10**9),
    "wall_time_s": (0.001, 30 * DAY),
    "max_format_errors": (1, 1000),
    "command_timeout_s": (0.001, 7 * DAY),
    "timeout_s": (0.001, 7 * DAY),
}


def plain_text(value: str, limit: int, what: str = "value") -> str:
    """One line of visible text of at most ``limit`` characters (names, tags, test ids)."""
    if len(value) > limit:
        raise ValueError(f"{what} of {len(value)} characters is too long (at most {limit})")
    ch = bad_char(value)
    if ch:
        raise ValueError(f"{what} {show(value)} holds the character {ch}; use printable characters only")
    return value
