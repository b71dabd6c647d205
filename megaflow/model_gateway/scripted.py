"""The deterministic ``scripted`` backend: replays the replies listed in the task spec.

The reply for a request is ``replies[n]`` where ``n`` is the episode's model-call count (else the
number of assistant messages already in the conversation), so the backend keeps no state and a
redelivered request gets the same reply.
A reply is either a string (the message content) or a whole assistant message
(``{"content": ..., "tool_calls": [...]}``), so tool-call agents can be scripted too. A dict reply may
carry ``latency_s`` (that reply's simulated generation time, instead of the section's ``latency_s``), so a
batch can script heavy-tailed latencies per episode (bench/rollout_tail.py).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any, Literal

from pydantic import Field, ValidationError

from megaflow.core.errors import ModelError
from megaflow.model_gateway.base import ModelReply, ModelRequest
from megaflow.model_gateway.errors import ModelRequestError
from megaflow.model_gateway.openai_config import OpenAIConfig


class ScriptedConfig(OpenAIConfig):
    """The ``model`` section of the scripted backend: its replies, plus every field of the openai
    backend's section (validated the same way, then ignored), so one spec runs on either backend."""

    backend: Literal["scripted"] = Field("scripted", description="The scripted backend.")  # type: ignore[assignment]
    replies: list[str | dict[str, Any]] = Field(
        ...,
        min_length=1,
        description="Replies in order: a string (content) or an assistant message "
        "({content, tool_calls, finish_reason, latency_s}; latency_s overrides the section's for that reply).",
    )
    latency_s: float = Field(
        0.0, ge=0, le=3600, description="Seconds each reply takes (simulated generation, for scale runs)."
    )


def _reply_latency(value: Any, default: float, n: int) -> float:
    """A reply's own ``latency_s`` (seconds, 0..3600) if it has one, else the section's."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 3600:
        raise ModelRequestError(
            f"bad model section: model.replies.{n}.latency_s: {value!r} must be seconds from 0 to 3600"
        )
    return float(value)


def _count_tokens(text: str) -> int:
    return max(1, len(text.split())) if text else 0


class _PromptCounts:
    """Prompt token counts per conversation, extended by the messages added since its last call: an
    episode's conversation only grows (a dropped reply changes its end, which is then recounted),
    so counting a long episode's prompt does not cost more with every step."""

    def __init__(self, max_sessions: int = 4096):
        self.max = max_sessions
        self._memo: OrderedDict[str, tuple[int, dict[str, Any], int]] = OrderedDict()  # session -> (n, last, tokens)
        self._lock = threading.Lock()

    def count(self, session: str, messages: list[dict[str, Any]]) -> int:
        with self._lock:
            memo = self._memo.pop(session, None) if session else None
        start, tokens = 0, 0
        if memo is not None and 0 < memo[0] <= len(messages) and messages[memo[0] - 1] == memo[1]:
            start, tokens = memo[0], memo[2]
        tokens += sum(_count_tokens(str(m.get("content") or "")) for m in messages[start:])
        if session and messages:
            with self._lock:
                self._memo[session] = (len(messages), messages[-1], tokens)
                while len(self._memo) > self.max:
                    self._memo.popitem(last=False)
        return tokens


class ScriptedBackend:
    """Replays ``request.model["replies"]`` in order; past the end it raises ModelError."""

    config_model = ScriptedConfig

    def __init__(self, settings: Any = None, redis_client: Any = None):
        self.settings = settings
        self._prompts = _PromptCounts()

    def complete(self, request: ModelRequest) -> ModelReply:
        started = time.perf_counter()
        try:
            config = ScriptedConfig.model_validate({"backend": "scripted", **request.model})
        except ValidationError as exc:
            err = exc.errors()[0]
            where = "model." + ".".join(str(p) for p in err["loc"])
            hint = " (the scripted backend needs model.replies: a non-empty list)" if where == "model.replies" else ""
            raise ModelRequestError(f"bad model section: {where}: {err['msg']}{hint}") from None
        replies = config.replies
        # the episode's call count (a dropped malformed reply is no longer in the messages); else count replies
        n = (
            request.call_index
            if request.call_index is not None
            else sum(1 for m in request.messages if m.get("role") == "assistant")
        )
        if n >= len(replies):
            raise ModelError(f"scripted replies exhausted: {len(replies)} given, reply #{n + 1} asked")
        raw = replies[n]
        message: dict[str, Any] = {"role": "assistant", **({"content": raw} if isinstance(raw, str) else raw)}
        latency = _reply_latency(message.pop("latency_s", None), config.latency_s, n)
        finish = str(message.pop("finish_reason", None) or ("tool_calls" if message.get("tool_calls") else "stop"))
        content = str(message.get("content") or "")
        prompt = self._prompts.count(request.session_id, request.messages)
        if latency:  # simulated generation time (scale runs); holds this worker thread like a real call
            time.sleep(latency)
        return ModelReply(
            content=content,
            prompt_tokens=prompt,
            completion_tokens=_count_tokens(content),
            latency_s=time.perf_counter() - started,
            finish_reason=finish,
            endpoint="scripted",
            model_name="scripted",
            policy_version=request.policy_version or config.policy_version,
            tool_calls=message.get("tool_calls") or None,
            message=message,
        )
