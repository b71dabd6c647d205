"""A per-episode OpenAI-compatible model gateway for installed agents: the key names the episode.

Each chat-completion request is sent to the episode's own model backend with its task's model
section on top (the same backends, endpoint limits and retry budget as the model step), and the
request with the whole reply (token ids and logprobs where the server gives them) is appended to
the episode's gateway log, which the env host's watch moves into the trajectory when the program
ends. A key works only for its episode and only while the episode is live.

Keys owned (``G`` = ``<prefix>:gw``): ``G:key:<sha256>`` -> episode id; ``G:log:<episode>`` list of
JSON records; ``G:n:<episode>`` the episode's gateway call counter.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
import uuid
from typing import TYPE_CHECKING, Any

from megaflow.core import states
from megaflow.core.errors import MegaflowError
from megaflow.model_gateway.base import ModelRequest

if TYPE_CHECKING:
    from megaflow.services.root import Root

KEY_TTL_S = 7 * 24 * 3600


class GatewayAuthError(MegaflowError, PermissionError):
    """The key names no live episode (wrong, revoked, or its episode finished)."""


def _sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class EpisodeGateway:
    """Issues per-episode keys and answers chat completions for them."""

    def __init__(self, root: Root):
        self.root = root
        self.base = f"{root.settings.key_prefix}:gw"

    def issue_key(self, episode_id: str) -> str:
        """A new key for the episode (``OPENAI_API_KEY`` of its installed agent)."""
        key = f"mf-{secrets.token_urlsafe(24)}"
        self.root.redis.set(f"{self.base}:key:{_sha(key)}", episode_id, ex=KEY_TTL_S)
        return key

    def revoke(self, key: str) -> None:
        self.root.redis.delete(f"{self.base}:key:{_sha(key)}")

    def episode_for(self, key: str) -> str:
        """The live episode a key names; GatewayAuthError otherwise."""
        raw = self.root.redis.get(f"{self.base}:key:{_sha(key)}") if key else None
        if not raw:
            raise GatewayAuthError("unknown or revoked API key")
        eid = str(raw)
        state = self.root.redis.hget(self.root.keys.episode(eid), "state")
        if state is None or state in states.TERMINAL:
            raise GatewayAuthError(f"episode {eid} is finished ({state or 'gone'}): its key no longer works")
        return eid

    def complete(self, key: str, body: dict[str, Any]) -> dict[str, Any]:
        """One OpenAI chat completion for the key's episode; returns the OpenAI response body."""
        eid = self.episode_for(key)
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            raise ValueError("the body must be a chat-completion request with a 'messages' list")
        if body.get("stream"):
            raise ValueError("stream=true is not supported by the episode gateway yet; send stream=false")
        ep = self.root.engine.load(eid, history=False)
        model = ep.spec.model.model_dump(exclude_none=True)
        backend = model.pop("backend", None) or self.root.settings.model_backend
        params = {k: v for k, v in body.items() if k not in ("messages", "model", "stream") and k not in model}
        n = int(self.root.redis.incr(f"{self.base}:n:{eid}"))
        request = ModelRequest(
            messages=body["messages"],
            model=model,
            session_id=eid,
            step=n,
            policy_version=ep.fields.get("policy_version") or None,
            batch_id=ep.batch_id,
            params=params,
            call_index=n - 1,
        )
        reply = self.root.backend(backend).complete(request)
        record = {
            "role": "gateway",
            "kind": "model_call",
            "call": n,
            "request": body,
            "reply": reply.to_json(),
            "t": time.time(),
        }
        pipe = self.root.redis.pipeline()
        pipe.rpush(f"{self.base}:log:{eid}", json.dumps(record))
        pipe.expire(f"{self.base}:log:{eid}", KEY_TTL_S)
        pipe.execute()
        return openai_body(reply, body.get("model") or reply.model_name or "megaflow")

    def records(self, episode_id: str) -> list[dict[str, Any]]:
        """The episode's gateway records not yet moved into its trajectory, oldest first."""
        return [json.loads(r) for r in self.root.redis.lrange(f"{self.base}:log:{episode_id}", 0, -1)]

    def forget(self, episode_id: str, n: int) -> None:
        """Drop the ``n`` oldest records (after they reached the trajectory)."""
        self.root.redis.ltrim(f"{self.base}:log:{episode_id}", n, -1)

    def drain(self, episode_id: str) -> list[dict[str, Any]]:
        """Take the episode's gateway records, oldest first."""
        out = self.records(episode_id)
        self.forget(episode_id, len(out))
        return out


def openai_body(reply: Any, model: str) -> dict[str, Any]:
    """The OpenAI chat.completion body of a backend reply (the server's own choices when it sent them)."""
    choices = reply.choices
    if not choices:
        message = reply.message or {"role": "assistant", "content": reply.content}
        choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": reply.finish_reason}
        if reply.logprobs_content:
            choice["logprobs"] = {"content": reply.logprobs_content}
        choices = [choice]
    usage = reply.usage or {
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.completion_tokens,
        "total_tokens": reply.prompt_tokens + reply.completion_tokens,
    }
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage,
    }
