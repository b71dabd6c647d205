"""A per-episode OpenAI-compatible model gateway for installed agents: the key names the episode.

Each chat-completion request becomes a model-service call: a ``megaflow.model.gateway_call`` task
on the model queue, answered by a model worker with the episode's own backend and its task's model
section on top (the same routing, endpoint limits, retry budget and backends as the model step);
the gateway's HTTP thread waits for the answer on a Redis list (``in_process=True`` calls the
backend in the gateway's own process instead, for tools without model workers). The request with
the whole reply (token ids and logprobs where the server gives them) is appended to the episode's
gateway log, which the env host's watch moves into the trajectory when the program ends. A key
works only for its episode and only while the episode is live.

A ``stream: true`` request is the same one call; the HTTP front sends the whole reply back as an
OpenAI-compatible event stream (megaflow.sandbox.gateway_stream), and the log records the request as sent.

Keys owned (named in megaflow.core.keys, ``Keys.gateway_*`` under ``<prefix>:gw``): ``key:<sha256>`` ->
episode id; ``log:<episode>`` list of JSON records; ``n:<episode>`` the episode's gateway call counter;
``call:<id>`` a call waiting for a model worker (JSON body and number); ``reply:<id>`` list holding the
worker's answer.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from megaflow.core import states, wire
from megaflow.core.errors import MegaflowError
from megaflow.model_gateway.base import ModelReply, ModelRequest

if TYPE_CHECKING:
    from megaflow.services.root import Root

KEY_TTL_S = 7 * 24 * 3600
CALL_TTL_S = 3600  # a call waiting for a model worker, and its answer, are dropped after this
REPLY_SLACK_S = 30.0  # the gateway waits the model's retry budget plus this for a worker's answer
HEARTBEAT_S = 10.0  # while a call waits, the caller's heartbeat runs this often (stream keep-alives)


# Request fields about how the agent receives the answer, never sent to the model: a streamed request makes
# the same one model-service call and the HTTP front re-sends its whole reply as events (sandbox.gateway_stream).
CLIENT_ONLY = ("messages", "model", "stream", "stream_options")


class GatewayAuthError(MegaflowError, PermissionError):
    """The key names no live episode (wrong, revoked, or its episode finished)."""


class GatewayModelError(MegaflowError):
    """The model call failed or no model worker answered in time (HTTP 502 to the agent)."""


def _sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class EpisodeGateway:
    """Issues per-episode keys and answers chat completions for them."""

    def __init__(self, root: Root, *, in_process: bool = False, heartbeat_s: float = HEARTBEAT_S):
        self.root = root
        self.heartbeat_s = heartbeat_s
        self.keys = root.keys  # every key name: megaflow.core.keys (gateway_*)
        self.in_process = in_process  # call the backend here instead of through the model queue
        self._waits: Any = None  # a pool of its own for the blocking waits: they never starve the root's pool

    def _wait_client(self) -> Any:
        if self._waits is None:
            import redis

            self._waits = redis.Redis.from_url(self.root.settings.redis_url, decode_responses=True)
        return self._waits

    def close(self) -> None:
        """Close the waits' own Redis pool (the root's is the caller's)."""
        if self._waits is not None:
            self._waits.close()
            self._waits = None

    def issue_key(self, episode_id: str) -> str:
        """A new key for the episode (``OPENAI_API_KEY`` of its installed agent)."""
        key = f"mf-{secrets.token_urlsafe(24)}"
        self.root.redis.set(self.keys.gateway_key(_sha(key)), episode_id, ex=KEY_TTL_S)
        return key

    def revoke(self, key: str) -> None:
        self.root.redis.delete(self.keys.gateway_key(_sha(key)))

    def episode_for(self, key: str) -> str:
        """The live episode a key names; GatewayAuthError otherwise."""
        raw = self.root.redis.get(self.keys.gateway_key(_sha(key))) if key else None
        if not raw:
            raise GatewayAuthError("unknown or revoked API key")
        eid = str(raw)
        state = self.root.redis.hget(self.root.keys.episode(eid), "state")
        if state is None or state in states.TERMINAL:
            raise GatewayAuthError(f"episode {eid} is finished ({state or 'gone'}): its key no longer works")
        return eid

    def complete(self, key: str, body: dict[str, Any], heartbeat: Callable[[], None] | None = None) -> dict[str, Any]:
        """One OpenAI chat completion for the key's episode; returns the OpenAI response body.

        The call goes to the model queue (a model worker answers, see :meth:`serve_call`) unless the
        gateway was made ``in_process``; either way the request and whole reply join the episode's log.
        ``heartbeat`` runs every ``heartbeat_s`` while the call waits on the model queue (the HTTP front
        keeps a stream's connection alive with it); an exception from it abandons the call.
        """
        eid = self.episode_for(key)
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            raise ValueError("the body must be a chat-completion request with a 'messages' list")
        check_stream_fields(body)
        n = int(self.root.redis.incr(self.keys.gateway_count(eid)))
        if self.in_process:
            backend, request = self._request(eid, body, n)
            reply = self.root.backend(backend).complete(request)
        else:
            reply = self._via_queue(eid, body, n, heartbeat)
        record = {
            "role": "gateway",
            "kind": "model_call",
            "call": n,
            "request": body,
            "reply": reply.to_json(),
            "t": time.time(),
        }
        pipe = self.root.redis.pipeline()
        pipe.rpush(self.keys.gateway_log(eid), json.dumps(record))
        pipe.expire(self.keys.gateway_log(eid), KEY_TTL_S)
        pipe.execute()
        return openai_body(reply, body.get("model") or reply.model_name or "megaflow")

    def _request(self, eid: str, body: dict[str, Any], n: int) -> tuple[str, ModelRequest]:
        """(backend name, request): the body with the episode's model section on top, as the model step sends it."""
        ep = self.root.engine.load(eid, history=False)
        model = ep.spec.model.model_dump(exclude_none=True)
        backend = model.pop("backend", None) or self.root.settings.model_backend
        params = {k: v for k, v in body.items() if k not in CLIENT_ONLY and k not in model}
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
        return backend, request

    def _via_queue(
        self, eid: str, body: dict[str, Any], n: int, heartbeat: Callable[[], None] | None = None
    ) -> ModelReply:
        """Send the call to the model queue and wait (this HTTP thread only) for the worker's answer."""
        r = self.root.redis
        call_id = uuid.uuid4().hex
        r.set(self.keys.gateway_call(call_id), json.dumps({"body": body, "n": n}), ex=CALL_TTL_S)
        self.root.dispatcher.send(wire.MODEL_GATEWAY_CALL, [eid, call_id], wire.MODEL_QUEUE)
        wait = self.root.settings.model_retry_budget_s + REPLY_SLACK_S
        deadline = time.monotonic() + wait
        item = None
        try:
            while item is None and (left := deadline - time.monotonic()) > 0:
                step = min(left, self.heartbeat_s) if heartbeat else left
                item = self._wait_client().blpop([self.keys.gateway_reply(call_id)], timeout=max(step, 0.01))
                if item is None and heartbeat and deadline - time.monotonic() > 0:
                    heartbeat()
        finally:
            if item is None:  # no answer or the caller left: a worker that picks it up later finds nothing to do
                r.delete(self.keys.gateway_call(call_id))
        if item is None:
            raise GatewayModelError(f"no model worker answered within {wait:.0f}s (is `megaflow worker model` up?)")
        out = json.loads(item[1])
        if "error" in out:
            err = out["error"]
            if err.get("bad_request"):
                raise ValueError(err["message"])
            if err.get("auth"):
                raise GatewayAuthError(err["message"])
            raise GatewayModelError(f"{err['type']}: {err['message']}")
        return ModelReply(**out["reply"])

    def serve_call(self, episode_id: str, call_id: str) -> str:
        """The model worker's side of one gateway call: run it on the episode's backend, push the answer.

        The call record is taken with GETDEL, so a redelivered task (or one the gateway gave up on) does nothing.
        """
        r = self.root.redis
        raw = r.getdel(self.keys.gateway_call(call_id))
        if raw is None:
            return "dropped"
        call = json.loads(str(raw))
        out: dict[str, Any]
        try:
            state = r.hget(self.root.keys.episode(episode_id), "state")
            if state is None or state in states.TERMINAL:
                raise GatewayAuthError(f"episode {episode_id} is finished ({state or 'gone'}): its key no longer works")
            backend, request = self._request(episode_id, call["body"], int(call["n"]))
            out = {"reply": self.root.backend(backend).complete(request).to_json()}
        except Exception as exc:  # every failure goes back to the waiting gateway as an HTTP error
            out = {
                "error": {
                    "type": type(exc).__name__,
                    "message": str(exc)[:2000],
                    "bad_request": isinstance(exc, (ValueError, TypeError)),
                    "auth": isinstance(exc, GatewayAuthError),
                }
            }
        pipe = r.pipeline()
        pipe.rpush(self.keys.gateway_reply(call_id), json.dumps(out))
        pipe.expire(self.keys.gateway_reply(call_id), CALL_TTL_S)
        pipe.execute()
        return "error" if "error" in out else "ok"

    def records(self, episode_id: str) -> list[dict[str, Any]]:
        """The episode's gateway records not yet moved into its trajectory, oldest first."""
        return [json.loads(r) for r in self.root.redis.lrange(self.keys.gateway_log(episode_id), 0, -1)]

    def forget(self, episode_id: str, n: int) -> None:
        """Drop the ``n`` oldest records (after they reached the trajectory)."""
        self.root.redis.ltrim(self.keys.gateway_log(episode_id), n, -1)

    def drain(self, episode_id: str) -> list[dict[str, Any]]:
        """Take the episode's gateway records, oldest first."""
        out = self.records(episode_id)
        self.forget(episode_id, len(out))
        return out


def call_limit(settings: Any) -> int:
    """How many calls one gateway server answers at once: ``gateway_max_calls``, or 4 per container slot of a host
    (an installed agent waits on one call at a time; the slack is for agents that call in parallel)."""
    return int(settings.gateway_max_calls) or 4 * int(settings.host_capacity)


def check_stream_fields(body: dict[str, Any]) -> None:
    """``stream`` is a boolean; ``stream_options`` an object, only with ``stream: true`` (ValueError: HTTP 400)."""
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise ValueError(f"'stream' must be true or false, not {stream!r}")
    options = body.get("stream_options")
    if options is None:
        return
    if not stream:
        raise ValueError("'stream_options' is only allowed with 'stream': true")
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise ValueError("'stream_options' must be an object like {\"include_usage\": true}")


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
