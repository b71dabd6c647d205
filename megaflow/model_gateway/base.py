"""The model backend protocol: one chat-completion request in, one reply out.

Backends are chosen by short name (``scripted``, ``openai``) and imported lazily, so an optional
dependency loads only when its backend is chosen.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass
class ModelRequest:
    """One chat-completion request of one episode step."""

    messages: list[dict[str, Any]]
    model: dict[str, Any] = field(default_factory=dict)  # the task spec's "model" section
    session_id: str = ""  # the episode id: sticky routing key
    step: int = 0
    policy_version: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ModelReply:
    """What a backend answered, with the accounting the episode records."""

    content: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    finish_reason: str = "stop"
    endpoint: str | None = None
    model_name: str | None = None
    policy_version: str | None = None
    token_ids: list[int] | None = None  # completion token ids, when the server returns them
    logprobs: list[float] | None = None  # one per completion token, when asked for (model.logprobs)
    prompt_token_ids: list[int] | None = None  # when the server returns them (vLLM return_token_ids)
    attempts: int = 1  # HTTP attempts this reply took (retries + 1)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@runtime_checkable
class ModelBackend(Protocol):
    """A chat-completion backend."""

    def complete(self, request: ModelRequest) -> ModelReply: ...


# name -> "module:factory"; a factory takes (settings, redis_client) and returns a ModelBackend.
BACKENDS: dict[str, str] = {
    "scripted": "megaflow.model_gateway.scripted:ScriptedBackend",
    "openai": "megaflow.model_gateway.openai:OpenAIBackend",
}


def load_backend(name: str, settings: Any, redis_client: Any = None) -> ModelBackend:
    """Instantiate the backend called ``name``; its module is imported only now."""
    try:
        target = BACKENDS[name]
    except KeyError:
        from megaflow.core.errors import ConfigError

        raise ConfigError(f"unknown model backend {name!r}; choose one of {sorted(BACKENDS)}") from None
    module_name, _, attr = target.partition(":")
    factory = getattr(importlib.import_module(module_name), attr)
    return factory(settings, redis_client)
