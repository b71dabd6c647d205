"""The model backend registry: a backend is one module plus one line in :data:`BACKENDS`.

Each backend class declares ``config_model``, a pydantic model of its task-spec ``model``
section (``backend: Literal[...]``, ``extra="forbid"``, every field documented), and is
constructed as ``cls(settings, redis_client)``. A user's backend is named by a dotted path
(``my_pkg.models:MyBackend`` or ``my_pkg.models.MyBackend``). Modules are imported only when a
backend is chosen, so an optional dependency loads only then.
"""

from __future__ import annotations

import importlib
from typing import Any

from pydantic import BaseModel, ValidationError

from megaflow.core.errors import ConfigError, SpecError

# name -> "module:class"; the class takes (settings, redis_client) and has a ``config_model``.
BACKENDS: dict[str, str] = {
    "scripted": "megaflow.model_gateway.scripted:ScriptedBackend",
    "openai": "megaflow.model_gateway.openai:OpenAIBackend",
}


def backend_class(name: str) -> Any:
    """The class of backend ``name``: a short name from :data:`BACKENDS` or a dotted path."""
    target = BACKENDS.get(name)
    if target is None:
        if "." not in name and ":" not in name:
            raise ConfigError(
                f"unknown model backend {name!r}; choose one of {sorted(BACKENDS)} "
                "or give a dotted path such as my_pkg.models:MyBackend"
            )
        target = name if ":" in name else "{}:{}".format(*name.rsplit(".", 1))
    module_name, _, attr = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"model backend {name!r} cannot be loaded ({target}): {exc}") from None
    if not isinstance(getattr(cls, "config_model", None), type) or not callable(getattr(cls, "complete", None)):
        raise ConfigError(
            f"model backend {name!r} ({target}) must define config_model (a pydantic model) and complete(request)"
        )
    return cls


def _describe(exc: ValidationError) -> tuple[str, str]:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    field = f"model.{where}" if where else "model"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown field for this backend; check the spelling, or put server extensions in model.extra_body"
    elif err["type"] == "missing":
        msg = "required field is missing; add it"
    return field, msg


def validate_model_section(section: dict[str, Any] | None, default_backend: str = "scripted") -> BaseModel:
    """Validate a task spec's ``model`` section against its backend's config (submit-time check).

    Raises SpecError naming the field (``model.temperature``) and what to do.
    """
    section = dict(section or {})
    section = {k: v for k, v in section.items() if v is not None or k == "backend"}
    name = section.get("backend") or default_backend
    try:
        cls = backend_class(name)
    except ConfigError as exc:
        raise SpecError(f"field 'model.backend': {exc}", field="model.backend") from None
    section["backend"] = name
    try:
        return cls.config_model.model_validate(section)
    except ValidationError as exc:
        field, msg = _describe(exc)
        raise SpecError(f"field '{field}': {msg}", field=field) from None


def load_backend(name: str, settings: Any, redis_client: Any = None) -> Any:
    """Instantiate backend ``name``; its module is imported only now."""
    return backend_class(name)(settings, redis_client)
