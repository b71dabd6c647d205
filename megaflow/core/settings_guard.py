"""Checks behind ``Settings.load``: bounds and safe names of every setting, unknown ``MEGAFLOW_*``
variables, the ``MEGAFLOW_CONFIG`` file, and one ``SettingsError`` naming the variable, the bad value
and the fix instead of a pydantic dump (issue 17, bad input)."""

from __future__ import annotations

import difflib
import os
import re
import stat
import typing
from pathlib import Path
from typing import Any

from pydantic import SecretStr, ValidationError

from megaflow.core import guards
from megaflow.core.errors import SettingsError

# MEGAFLOW_* variables that are not settings (read by the CLI, the tests or Settings.load itself)
NOT_SETTINGS = frozenset({"MEGAFLOW_CONFIG", "MEGAFLOW_DEBUG", "MEGAFLOW_COLLECT"})
NOT_SETTINGS_PREFIX = ("MEGAFLOW_TEST_",)
MAX_CONFIG_BYTES = 1 << 20
MIB = 1 << 20
DAY = guards.DAY

# (lowest, highest) on top of each field's own ge/gt; names not listed fall back to _generic_bounds()
BOUNDS: dict[str, tuple[float, float]] = {
    # one thread per model call in flight; a process holds ~30,000 (vm.max_map_count 65530: two maps a thread)
    "model_concurrency": (1, 30_000),
    "agent_concurrency": (1, 1024),
    "env_concurrency": (1, 30_000),
    "visibility_timeout_s": (0, 30 * DAY),
    "global_limit": (1, 1_000_000),
    "user_limit": (1, 1_000_000),
    "host_capacity": (1, 100_000),  # a sim host holds tens of thousands of sandboxes
    "boot_concurrency": (1, 1000),
    "boot_rate_per_s": (0.001, 10_000),
    "lease_s": (0.05, DAY),
    "host_ttl_s": (0.05, DAY),
    "sweep_interval_s": (0.05, DAY),
    "warm_pool_size": (0, 1000),
    "container_cpus": (0.01, 1024),
    "container_pids": (16, 4_194_304),
    "output_cap_bytes": (256, 64 * MIB),
    "image_disk_budget_gb": (1e-6, 1_000_000),
    "max_steps": (1, 10_000),
    "endpoint_concurrency": (1, 100_000),
    "model_max_retries": (0, 100),
    "model_unhealthy_after": (1, 10_000),
    "flower_port": (1, 65535),
    "metrics_port": (0, 65535),
    "events_maxlen": (1000, 10**9),
    "events_retain_s": (0, 30 * DAY),
    "mongo_ttl_days": (0.001, 36_500),
    "max_batch_episodes": (1, 1_000_000),
    "max_spec_bytes": (1024, 256 * MIB),
    "max_task_file_bytes": (1024, 1 << 36),
}
_MEMORY = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([bkmg]?)b?", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_ADDRESS = re.compile(r"[A-Za-z0-9_.:\[\]-]{1,255}")
_BACKEND = re.compile(r"[A-Za-z_][A-Za-z0-9_.:]{0,199}")


def num(x: float) -> str:
    """A bound as people write it: 1,000,000 or 0.05."""
    return f"{int(x):,}" if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def _generic_bounds(name: str, value: float) -> tuple[float, float]:
    if name.endswith("_s"):
        return 0.001 if isinstance(value, float) else 0, 30 * DAY
    if name.endswith("_port"):
        return 0, 65535
    return -1e12, 1e12


def memory_bytes(text: str) -> int:
    """Bytes of a Docker memory size (``512m``, ``1g``, ``1.5g``, ``1073741824``); ValueError if not one."""
    m = _MEMORY.fullmatch(text.strip())
    if not m:
        raise ValueError(f"{guards.show(text)} is not a Docker memory size: use a number with b, k, m or g, e.g. 1g")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _string(name: str, value: str) -> str:
    if name == "host_name":
        return guards.named(
            value, guards.SAFE_NAME, guards.NAME_RULE + ": it names queue env.<host> and a Docker label"
        )
    if name == "key_prefix":
        return guards.named(value, guards.KEY_PREFIX, "1-64 characters of letters, digits, '.', '_', ':' or '-'")
    if name == "default_image":
        return guards.image_ref(value)
    if name == "container_memory":
        n = memory_bytes(value)
        if not 6 * MIB <= n <= 1 << 42:
            raise ValueError(f"{value!r} is outside 6m (Docker's minimum) to 4096g")
    elif name == "redis_url":
        _redis_url(value)
    elif name in _URL_SCHEMES and value:
        schemes, example = _URL_SCHEMES[name]
        if not value.lower().startswith(schemes):
            raise ValueError(f"must start with {' or '.join(schemes)}, e.g. {example}")
    elif name == "state_dir":
        value = os.path.expanduser(value)
        if not os.path.isabs(value):
            raise ValueError(
                "must be an absolute directory (every process must find the same one), e.g. /var/lib/megaflow"
            )
    elif name.endswith("_address") and not _ADDRESS.fullmatch(value):
        raise ValueError(f"{guards.show(value)} is not a host address; use an IP address or host name, e.g. 127.0.0.1")
    elif name == "model_backend" and not _BACKEND.fullmatch(value):
        raise ValueError(f"{guards.show(value)} is not a backend name (scripted, openai) or a dotted path")
    return value


_URL_SCHEMES: dict[str, tuple[tuple[str, ...], str]] = {
    "metadata_url": (("sqlite:///", "mongodb://", "mongodb+srv://"), "sqlite:////var/lib/megaflow/megaflow.db"),
    "artifacts_url": (("file:///", "s3://"), "s3://bucket/prefix"),
    "s3_endpoint_url": (("http://", "https://"), "http://minio:9000"),
}


def _redis_url(value: str) -> None:
    from urllib.parse import urlsplit

    if not value.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("must start with redis://, rediss:// or unix://, e.g. redis://127.0.0.1:6379/0")
    parts = urlsplit(value)
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ValueError("has a bad port; use redis://HOST:PORT/DB, e.g. redis://127.0.0.1:6379/0") from None
    db = parts.path.strip("/")
    if parts.scheme != "unix" and db and not (db.isdigit() and int(db) < 100_000):
        raise ValueError(f"database {db!r} must be a number, e.g. redis://127.0.0.1:6379/0")


def redact(text: str) -> str:
    """A URL's password replaced by ***."""
    return re.sub(r"//[^@/]*@", "//***@", text)


def check_setting(name: str, value: Any) -> Any:
    """One setting's value within its bounds and, for names that reach queues, keys or Docker, safe."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        low, high = BOUNDS.get(name) or _generic_bounds(name, value)
        if not low <= value <= high:
            raise ValueError(f"must be between {num(low)} and {num(high)}")
        return value
    if isinstance(value, SecretStr):
        if guards.bad_char(value.get_secret_value()):
            raise ValueError("holds a control or invisible character (newline, NUL, ...); remove it")
        return value
    if isinstance(value, str):
        ch = guards.bad_char(value)
        if ch:
            raise ValueError(f"holds the character {ch}; use printable characters only")
        if len(value) > 4096:
            raise ValueError(f"is {len(value)} characters long; at most 4096")
        return _string(name, value)
    if isinstance(value, list):
        if len(value) > 1000:
            raise ValueError(f"has {len(value)} entries; at most 1000")
        for item in value:
            if isinstance(item, str):
                check_setting(name + "[]", item)
                if name == "model_endpoints" and not item.startswith(("http://", "https://")):
                    raise ValueError(f"{guards.show(item)} is not an http(s) base URL, e.g. http://gpu1:8000/v1")
    return value


# --- Settings.load ------------------------------------------------------------------------------
def check_environment(fields: typing.Iterable[str]) -> None:
    """Refuse a ``MEGAFLOW_*`` variable that is no setting, naming the closest real one."""
    known = sorted(f"MEGAFLOW_{n.upper()}" for n in fields)
    for key in sorted(os.environ):
        upper = key.upper()
        if not upper.startswith("MEGAFLOW_") or upper in known or upper in NOT_SETTINGS:
            continue
        if upper.startswith(NOT_SETTINGS_PREFIX):
            continue
        close = difflib.get_close_matches(upper, known, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}? " if close else ""
        raise SettingsError(
            f"{key} is not a MegaFlow setting; {hint}Unset it (the README lists every setting).", setting=key
        )


def read_config(fields: typing.Iterable[str]) -> tuple[str, dict[str, Any]] | None:
    """(path, mapping) of the ``MEGAFLOW_CONFIG`` YAML file after checking it; None when unset."""
    path = os.environ.get("MEGAFLOW_CONFIG")
    if not path:
        return None

    def bad(problem: str) -> SettingsError:
        return SettingsError(
            f"MEGAFLOW_CONFIG={guards.show(path)}: {problem}; point it at a YAML file of "
            "settings (name: value) or unset it",
            setting="MEGAFLOW_CONFIG",
        )

    if guards.bad_char(path):
        raise bad("the path holds a control character")
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise bad("not a regular file")
        if st.st_size > MAX_CONFIG_BYTES:
            raise bad(f"{st.st_size:,} bytes is too large for a settings file (at most {MAX_CONFIG_BYTES:,})")
        raw = Path(path).read_bytes()[: MAX_CONFIG_BYTES + 1]
    except FileNotFoundError:
        raise bad("no such file") from None
    except OSError as exc:
        raise bad(f"cannot read it ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise bad("not UTF-8 text") from None
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise bad(f"not valid YAML{where} ({getattr(exc, 'problem', None) or 'syntax error'})") from None
    except RecursionError:
        raise bad("nested too deeply") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise bad(f"holds a {type(data).__name__}, not a mapping of settings")
    problem = guards.json_problem(data, max_depth=3)
    if problem and not str(problem[1]).startswith("has a key"):
        raise bad(f"'{guards.dotted(problem[0])}' {problem[1]}")
    known = sorted(fields)
    for key in data:
        if not isinstance(key, str) or key not in known:
            close = difflib.get_close_matches(str(key).lower(), known, n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise SettingsError(
                f"MEGAFLOW_CONFIG {path}: {guards.show(key)} is not a MegaFlow setting; {hint}"
                "Remove it (settings are the MEGAFLOW_* names in lower case, without the prefix).",
                setting="MEGAFLOW_CONFIG",
            )
    return path, data


def _env_value(name: str) -> tuple[str, str] | None:
    var = f"MEGAFLOW_{name.upper()}"
    for key, value in os.environ.items():
        if key.upper() == var and value != "":
            return key, value
    return None


def _expected(cls: Any, name: str) -> str:
    """What a setting takes, e.g. 'a whole number from 1 to 1000000 (default 64)'."""
    field = cls.model_fields[name]
    ann = field.annotation
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    if typing.get_origin(ann) is typing.Union and len(args) == 1:
        ann = args[0]
    if ann is bool:
        kind = "true or false"
    elif ann is int:
        kind = "a whole number"
    elif ann is float:
        kind = "a number"
    elif typing.get_origin(ann) is typing.Literal:
        kind = "one of " + ", ".join(str(a) for a in typing.get_args(ann))
    elif typing.get_origin(ann) is list:
        kind = "a comma-separated list (or a JSON list)"
    else:
        kind = ""
    if ann in (int, float):
        low = next((getattr(m, a) for m in field.metadata for a in ("ge", "gt") if hasattr(m, a)), None)
        low_b, high = BOUNDS.get(name) or _generic_bounds(name, 1.0 if ann is float else 1)
        low = low_b if low is None else max(low, low_b)
        kind += f" from {num(low)} to {num(high)}"
    default = field.get_default(call_default_factory=False) if field.default_factory is None else None
    if default not in (None, "", []) and not isinstance(default, SecretStr):
        return kind + f" (default {default})" if kind else f" (default {default})"
    return kind


def settings_error(
    cls: Any, exc: ValidationError, overrides: dict[str, Any], config: tuple[str, dict[str, Any]] | None
) -> SettingsError:
    """One SettingsError for a failed Settings(): the variable, the bad value, the fix."""
    errors = exc.errors()
    err = errors[0]
    more = f" (and {len(errors) - 1} more bad setting{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    loc = err.get("loc") or ()
    name = str(loc[0]) if loc else ""
    if not name:
        return SettingsError(f"settings: {msg}{more}")
    var = f"MEGAFLOW_{name.upper()}"
    if err.get("type") == "extra_forbidden":
        known = sorted(cls.model_fields)
        close = difflib.get_close_matches(name.lower(), known, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return SettingsError(f"{name!r} is not a MegaFlow setting{hint}{more}", setting=var)
    secret = "password" in name or "api_key" in name
    env = _env_value(name)
    if name in overrides:
        where, value = f"{name} (given to Settings.load)", err.get("input")
    elif env:
        where, value = env
    elif config and name in config[1]:
        where, value = f"{name} in {config[0]}", config[1][name]
    else:
        where, value = f"{var} (unset, its default)", err.get("input")
    raw = value if isinstance(value, str) else err.get("input")
    shown = "'***'" if secret else guards.show(redact(raw) if isinstance(raw, str) else raw)
    expected = _expected(cls, name)
    if expected and not expected.startswith(" "):
        fix = f"set {var} to {expected}, or unset it"
    else:
        fix = f"fix {var} or unset it{expected}"
    return SettingsError(f"{where}={shown}: {msg}; {fix}{more}", setting=var)


def load(cls: Any, overrides: dict[str, Any]) -> Any:
    """``cls(**overrides)`` from the environment and MEGAFLOW_CONFIG, every failure a SettingsError."""
    from pydantic_settings import SettingsError as SourceError

    check_environment(cls.model_fields)
    config = read_config(cls.model_fields)
    try:
        return cls(**overrides)
    except ValidationError as exc:
        raise settings_error(cls, exc, overrides, config) from None
    except SourceError as exc:  # a source could not parse a value (pydantic-settings' own error)
        m = re.search(r'field "([a-z0-9_]+)"', str(exc))
        var = f"MEGAFLOW_{m.group(1).upper()}" if m else "a MEGAFLOW_* setting"
        raise SettingsError(f"{var}: cannot be read ({str(exc)[:200]}); fix or unset it", setting=var) from None
    except (OverflowError, RecursionError) as exc:
        raise SettingsError(f"settings: a value is out of range ({exc}); check the MEGAFLOW_* numbers") from None
