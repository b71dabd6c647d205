"""Typed config of each env backend, and the one factory that builds an ``EnvHost`` from settings.

``settings.env_backend`` is a mapping with a ``type``: ``docker``, ``sim``, or a dotted path to a
user's class (``mypkg.mymod:MyHost`` or ``mypkg.mymod.MyHost``). Backends are imported only when
chosen, so the ``sim`` backend never imports the Docker SDK.

A third-party class is built with ``cls.from_config(config, settings=, name=, redis=, keys=)``
when it has that classmethod, else ``cls(config, settings=, name=, redis=, keys=)``; ``config``
is the mapping validated against the class's ``Config`` pydantic model when it has one.
"""

from __future__ import annotations

import importlib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from megaflow.core.errors import ConfigError
from megaflow.env_hosts.sim_config import SimEnvConfig

__all__ = ["DockerEnvConfig", "SimEnvConfig", "load_env_host", "validate_env_config"]

BUILTIN = ("docker", "sim")


class DockerEnvConfig(BaseModel):
    """Containers through the local Docker engine (limits, images and pools come from the settings)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["docker"] = Field("docker", description="Selects the Docker backend.")
    sessions: bool = Field(
        True,
        description="Open an exec session (a runner inside the container) after a container's first "
        "plain exec, so later commands skip `docker exec`.",
    )
    warm_images: list[str] = Field(
        default_factory=list,
        description="Images kept warm on this host regardless of demand (persistent mode; "
        "default: the default image when env_mode is persistent).",
    )


def _import_dotted(path: str) -> Any:
    """``pkg.mod:Name`` or ``pkg.mod.Name`` -> the object (a ConfigError naming the path when it fails)."""
    module, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    if not module or not attr:
        raise ConfigError(
            f"env_backend.type: {path!r} is neither 'docker', 'sim' nor a dotted path like 'mypkg.mymod:MyHost'"
        )
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"env_backend.type: cannot import {path!r} ({exc}); is the package installed on every env host?"
        ) from exc
    return obj


def _format(exc: ValidationError) -> str:
    """One line per field; union branches (``constrained-float``, ``tagged-union[...]``) left out of the path."""
    by_field: dict[str, str] = {}
    for err in exc.errors():
        parts = [str(p) for p in err["loc"] if not (isinstance(p, str) and ("[" in p or "-" in p))]
        where = ".".join(["env_backend", *parts])
        by_field[where] = err["msg"]  # for a union the last branch's message is the most specific
    return "; ".join(f"{where}: {msg}" for where, msg in by_field.items())


def validate_env_config(config: dict[str, Any] | None) -> Any:
    """The typed config of ``config`` (a pydantic model, or the mapping for a class without ``Config``).

    Raises ConfigError with a message naming the field and the fix.
    """
    config = {"type": "docker"} if config is None else config
    if not isinstance(config, dict):
        raise ConfigError(f"env_backend must be a mapping with a 'type', not {type(config).__name__}")
    kind = config.get("type")
    if not isinstance(kind, str) or not kind:
        raise ConfigError(
            "env_backend.type is missing: set it to 'docker', 'sim' or a dotted path like 'mypkg.mymod:MyHost'"
        )
    model: Any = None
    if kind in BUILTIN:
        model = DockerEnvConfig if kind == "docker" else SimEnvConfig
    else:
        model = getattr(_import_dotted(kind), "Config", None)
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return dict(config)
    try:
        return model.model_validate(config)
    except ValidationError as exc:
        raise ConfigError(_format(exc)) from None


def uses_docker(settings) -> bool:
    """Whether env hosts of these settings run containers on a Docker engine (``env_backend.type: docker``)."""
    return (getattr(settings, "env_backend", None) or {}).get("type", "docker") == "docker"


def load_env_host(settings, *, name: str | None = None, redis=None, keys=None, is_live=None):
    """Build the env backend ``settings.env_backend`` names, for env host ``name`` (default settings.host_name)."""
    config = validate_env_config(getattr(settings, "env_backend", None))
    name = name or settings.host_name
    kind = config["type"] if isinstance(config, dict) else config.type
    if kind == "docker":
        import docker

        from megaflow.env_hosts.docker_host import DockerHost

        client = docker.from_env(timeout=max(60, int(settings.boot_timeout_s)))
        return DockerHost(
            client,
            settings,
            name=name,
            redis_client=redis,
            keys=keys,
            is_live=is_live,
            warm_images=tuple(config.warm_images),
            sessions=config.sessions,
        )
    if kind == "sim":
        from megaflow.env_hosts.sim import SimHost

        return SimHost(config, settings, name=name, is_live=is_live)
    cls = _import_dotted(kind)
    build = getattr(cls, "from_config", None)
    if build is not None:
        return build(config, settings=settings, name=name, redis=redis, keys=keys)
    return cls(config, settings=settings, name=name, redis=redis, keys=keys)
