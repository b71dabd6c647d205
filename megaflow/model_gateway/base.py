"""The model backend protocol: one chat-completion request in, one reply out, both whole.

A request carries the conversation (every message key a chat API knows: role, content,
tool_calls, tool_call_id, name), the task spec's ``model`` section and per-call OpenAI fields;
a reply carries the whole assistant message (content, tool_calls, reasoning) with finish reason,
usage, logprobs and token ids when the server returns them, plus the call's accounting.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

# Keys of a history message that go to the model; anything else (step, accounting) stays on MegaFlow's side.
MESSAGE_KEYS = ("role", "content", "name", "tool_calls", "tool_call_id", "function_call")


def chat_message(record: dict[str, Any]) -> dict[str, Any]:
    """The part of a history record a chat API accepts (role, content, tool_calls, tool_call_id, name)."""
    out = {k: record[k] for k in MESSAGE_KEYS if k in record}
    if out.get("role") == "assistant" and not out.get("tool_calls"):
        out.pop("tool_calls", None)  # an empty list is refused by some servers
    if out.get("function_call") is None or out.get("tool_calls"):  # legacy twin of tool_calls (llama.cpp)
        out.pop("function_call", None)
    if out.get("name") is None:
        out.pop("name", None)
    return out


@dataclass
class ModelRequest:
    """One chat-completion request of one episode step.

    ``messages`` may share its dicts with the episode's next request (the conversation is built
    incrementally, megaflow.agents.conversation): a backend reads them and never changes them.
    """

    messages: list[dict[str, Any]]
    model: dict[str, Any] = field(default_factory=dict)  # the task spec's "model" section (backend's config)
    session_id: str = ""  # the episode id: sticky routing key
    step: int = 0
    policy_version: str | None = None
    batch_id: str = ""  # scope of an endpoint refusing our credentials (401/403)
    params: dict[str, Any] = field(default_factory=dict)  # per-call request fields (tools, ...), over the section's
    call_index: int | None = None  # how many model calls the episode made before this one

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ModelReply:
    """What a backend answered (the whole message), with the accounting the episode records."""

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
    tool_calls: list[dict[str, Any]] | None = None  # OpenAI tool calls: [{id, type, function: {name, arguments}}]
    reasoning_content: str | None = None  # reasoning models (vLLM reasoning parsers, DeepSeek)
    message: dict[str, Any] | None = None  # the whole assistant message as the server sent it (streams reassembled)
    usage: dict[str, Any] | None = None  # the server's whole usage object
    logprobs_content: list[dict[str, Any]] | None = None  # choice.logprobs.content: token, logprob, top_logprobs
    choices: list[dict[str, Any]] | None = None  # every choice, when more than one was asked for (n > 1)
    streamed: bool = False  # the reply came as server-sent events

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def history_record(self, step: int) -> dict[str, Any]:
        """The assistant message for the episode history: the message's own keys first, accounting beside."""
        record: dict[str, Any] = {**(self.message or {}), "role": "assistant", "content": self.content, "step": step}
        for f in fields(self):  # not asdict: no deep copy of token ids and logprobs (the record is encoded once)
            value = getattr(self, f.name)
            if f.name not in ("content", "message") and value is not None and f.name not in record:
                record[f.name] = value
        return record


class BackendConfig(BaseModel):
    """Base of every backend's spec section: ``backend`` names it; each backend adds its own fields."""

    model_config = ConfigDict(extra="forbid")

    backend: str = Field(..., description="The backend's name (or a dotted path to a user's backend class).")


@runtime_checkable
class ModelBackend(Protocol):
    """A chat-completion backend: ``config_model`` validates its spec section; ``complete`` answers."""

    config_model: ClassVar[type[BackendConfig]]

    def complete(self, request: ModelRequest) -> ModelReply: ...
