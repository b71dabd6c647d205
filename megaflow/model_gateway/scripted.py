"""The deterministic ``scripted`` backend: replays the replies listed in the task spec.

The reply for a request is ``replies[n]`` where ``n`` is the number of assistant messages already
in the conversation, so the backend keeps no state and a redelivered request gets the same reply.
"""

from __future__ import annotations

import time
from typing import Any

from megaflow.core.errors import ModelError
from megaflow.model_gateway.base import ModelReply, ModelRequest


def _count_tokens(text: str) -> int:
    return max(1, len(text.split())) if text else 0


class ScriptedBackend:
    """Replays ``request.model["replies"]`` in order; past the end it raises ModelError."""

    def __init__(self, settings: Any = None, redis_client: Any = None):
        self.settings = settings

    def complete(self, request: ModelRequest) -> ModelReply:
        started = time.perf_counter()
        replies = request.model.get("replies")
        if not isinstance(replies, list) or not all(isinstance(r, str) for r in replies):
            raise ModelError("scripted backend needs model.replies: a list of strings")
        n = sum(1 for m in request.messages if m.get("role") == "assistant")
        if n >= len(replies):
            raise ModelError(f"scripted replies exhausted: {len(replies)} given, reply #{n + 1} asked")
        content = replies[n]
        latency = request.model.get("latency_s")
        if latency:  # simulated generation time (scale runs); holds this worker thread like a real call
            time.sleep(float(latency))
        prompt = sum(_count_tokens(str(m.get("content", ""))) for m in request.messages)
        return ModelReply(
            content=content,
            prompt_tokens=prompt,
            completion_tokens=_count_tokens(content),
            latency_s=time.perf_counter() - started,
            endpoint="scripted",
            model_name="scripted",
            policy_version=request.policy_version,
        )
