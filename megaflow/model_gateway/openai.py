"""The ``openai`` backend: any OpenAI-compatible chat-completions endpoint (vLLM, SGLang, hosted APIs).

One request: choose an endpoint from the model's pool (sticky per episode, least outstanding,
healthy only, one concurrency slot), POST ``/chat/completions``, and on 429 / 408 / 5xx /
connection errors / time-outs retry with exponential backoff and jitter (honouring
``Retry-After``), within ``model_timeout_s * (model_max_retries + 1)`` in all. A 4xx request error
is not retried: a context-length overflow raises :class:`ContextLengthError` (the episode ends
cleanly), any other raises :class:`ModelError`; retries used up raise
:class:`ModelUnavailableError`, which is retryable.

The task spec's ``model`` section may set ``model_name``, ``endpoints`` (or one ``base_url``),
``temperature``, ``max_tokens``, ``top_p``, ``stop``, ``seed``, ``logprobs``, ``top_logprobs``,
``policy_version`` and ``extra_body`` (merged into the request body, for server extensions such as
vLLM's ``return_token_ids``); otherwise settings give ``model_name``, ``model_endpoints`` and
``model_api_key``.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import redis

from megaflow.core.errors import ContextLengthError, ModelError, ModelUnavailableError, SpecError
from megaflow.core.keys import Keys
from megaflow.model_gateway.base import ModelReply, ModelRequest
from megaflow.model_gateway.pool import EndpointPool

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
CONTEXT_MARKERS = ("context length", "context_length", "maximum context", "context window", "too many tokens",
                   "prompt is too long")
SAMPLING_FIELDS = {"temperature": (int, float), "max_tokens": int, "top_p": (int, float), "seed": int,
                   "stop": (str, list), "top_logprobs": int}
SPEC_FIELDS = {"backend", "model_name", "endpoints", "base_url", "logprobs", "policy_version", "extra_body",
               *SAMPLING_FIELDS}


@dataclass
class ModelCall:
    """What one task spec's ``model`` section asks of the openai backend (validated)."""

    model_name: str
    endpoints: list[str]
    params: dict[str, Any] = field(default_factory=dict)
    policy_version: str | None = None


def parse_model_section(section: dict[str, Any], settings: Any) -> ModelCall:
    """Validate a task spec's ``model`` section; raises SpecError naming the field (usable at submit)."""
    if not isinstance(section, dict):
        raise SpecError("model must be a mapping", field="model")
    unknown = set(section) - SPEC_FIELDS - {"replies"}
    if unknown:
        raise SpecError(f"unknown field(s) {sorted(unknown)}; allowed: {sorted(SPEC_FIELDS)}", field="model")
    name = section.get("model_name", settings.model_name)
    if not isinstance(name, str) or not name:
        raise SpecError("model.model_name must be a non-empty string", field="model.model_name")
    endpoints = section.get("endpoints")
    if endpoints is None and section.get("base_url") is not None:
        endpoints = [section["base_url"]]
    if endpoints is None:
        endpoints = list(settings.model_endpoints)
    if not isinstance(endpoints, list) or not all(isinstance(e, str) and e.startswith("http") for e in endpoints):
        raise SpecError("model.endpoints must be a list of http(s) base URLs, e.g. http://gpu1:8000/v1",
                        field="model.endpoints")
    params: dict[str, Any] = {}
    for key, kind in SAMPLING_FIELDS.items():
        if key in section and section[key] is not None:
            if not isinstance(section[key], kind) or isinstance(section[key], bool):
                raise SpecError(f"model.{key} has the wrong type ({type(section[key]).__name__})", field=f"model.{key}")
            params[key] = section[key]
    if section.get("logprobs"):
        params["logprobs"] = True
    extra = section.get("extra_body") or {}
    if not isinstance(extra, dict):
        raise SpecError("model.extra_body must be a mapping", field="model.extra_body")
    params.update(extra)
    version = section.get("policy_version")
    return ModelCall(name, endpoints, params, None if version is None else str(version))


def backoff_delay(attempt: int, base: float, cap: float, retry_after: float | None = None) -> float:
    """Exponential backoff with jitter: about ``base * 2**attempt`` (half of it random), at most ``cap``;
    a server's ``Retry-After`` raises it (still capped)."""
    delay = min(cap, base * (2 ** attempt)) * (0.5 + random.random() / 2)
    if retry_after:
        delay = max(delay, min(retry_after, cap))
    return delay


def _error_message(resp: httpx.Response) -> tuple[str, str]:
    """(message, code) from an OpenAI-style ({"error": {...}}) or vLLM-style ({"message": ...}) error body."""
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:500], ""
    err = body.get("error", body) if isinstance(body, dict) else {}
    if isinstance(err, str):
        return err, ""
    if not isinstance(err, dict):
        return str(body)[:500], ""
    return str(err.get("message", ""))[:2000], str(err.get("code") or err.get("type") or "")


def _retry_after(resp: httpx.Response) -> float | None:
    try:
        return float(resp.headers.get("Retry-After", ""))
    except ValueError:
        return None


def parse_reply(data: dict[str, Any]) -> dict[str, Any]:
    """The ModelReply fields of one chat-completion response (tokens, logprobs, token ids)."""
    choice = data["choices"][0]
    message = choice.get("message") or {}
    usage = data.get("usage") or {}
    out: dict[str, Any] = {
        "content": message.get("content") or "",
        "finish_reason": choice.get("finish_reason") or "stop",
        "prompt_tokens": int(usage.get("prompt_tokens") or 0),
        "completion_tokens": int(usage.get("completion_tokens") or 0),
    }
    content = (choice.get("logprobs") or {}).get("content")
    if content:
        out["logprobs"] = [float(c.get("logprob", 0.0)) for c in content]
        tokens = [str(c.get("token", "")) for c in content]
        if all(t.startswith("token_id:") for t in tokens):  # vLLM --return-tokens-as-token-ids
            out["token_ids"] = [int(t[len("token_id:"):]) for t in tokens]
    if isinstance(choice.get("token_ids"), list):  # vLLM return_token_ids
        out["token_ids"] = [int(t) for t in choice["token_ids"]]
    if isinstance(data.get("prompt_token_ids"), list):
        out["prompt_token_ids"] = [int(t) for t in data["prompt_token_ids"]]
    return out


class OpenAIBackend:
    """Chat completions over HTTP with endpoint pools, retries and error classes (see the module doc)."""

    def __init__(self, settings: Any, redis_client: Any = None):
        if redis_client is None:
            import redis

            redis_client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
        self.settings = settings
        self.redis = redis_client
        self.keys = Keys(settings.key_prefix)
        headers = {}
        if settings.model_api_key is not None:
            headers["Authorization"] = f"Bearer {settings.model_api_key.get_secret_value()}"
        self.http = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(settings.model_timeout_s, connect=min(10.0, settings.model_timeout_s)),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=max(64, 2 * settings.model_concurrency)),
        )
        self._pools: dict[tuple[str, tuple[str, ...]], EndpointPool] = {}

    def close(self) -> None:
        self.http.close()

    def pool(self, model_name: str, endpoints: list[str]) -> EndpointPool:
        key = (model_name, tuple(endpoints))
        pool = self._pools.get(key)
        if pool is None:
            s = self.settings
            pool = self._pools[key] = EndpointPool(
                self.redis, self.keys, model_name, endpoints, concurrency=s.endpoint_concurrency,
                lease_s=s.model_timeout_s + 30, unhealthy_after=s.model_unhealthy_after, cooldown_s=s.model_cooldown_s,
                sticky_ttl_s=s.model_sticky_ttl_s, probe=self.probe,
            )
        return pool

    def probe(self, endpoint: str) -> bool:
        """True if ``GET {endpoint}/models`` answers 200 within a few seconds."""
        try:
            return self.http.get(f"{endpoint}/models", timeout=min(5.0, self.settings.model_timeout_s)).status_code == 200
        except httpx.HTTPError:
            return False

    def complete(self, request: ModelRequest) -> ModelReply:
        s = self.settings
        try:
            call = parse_model_section(request.model, s)
        except SpecError as exc:  # submit should have caught it; at run time it ends the episode cleanly
            raise ModelError(f"bad model section: {exc}") from None
        version = request.policy_version or call.policy_version or s.policy_version
        body: dict[str, Any] = {"model": call.model_name, "messages": request.messages, **call.params}
        metadata = {"session_id": str(request.session_id), "step": str(request.step)}
        if version:
            metadata["policy_version"] = version
        body.setdefault("metadata", metadata)
        if body["metadata"] is None:  # extra_body {metadata: null}: for APIs that refuse it without `store`
            del body["metadata"]
        headers = {"X-Policy-Version": version} if version else {}
        pool = self.pool(call.model_name, call.endpoints)

        started = time.monotonic()
        deadline = started + s.model_timeout_s * (s.model_max_retries + 1)
        problem = "no attempt made"
        attempts = 0
        for attempt in range(s.model_max_retries + 1):
            retry_after = None
            try:
                lease = pool.acquire(request.session_id, deadline)
            except redis.RedisError as exc:  # no slot can be taken: retry the step later
                raise ModelUnavailableError(f"Redis unreachable while choosing a model endpoint: {exc}") from exc
            attempts += 1
            try:
                timeout = max(0.1, min(s.model_timeout_s, deadline - time.monotonic()))
                resp = self.http.post(f"{lease.endpoint}/chat/completions", json=body, headers=headers, timeout=timeout)
            except httpx.TimeoutException:
                problem = f"{lease.endpoint} timed out after {timeout:.1f}s"
                pool.failed(lease.endpoint)
            except httpx.TransportError as exc:
                problem = f"{lease.endpoint} unreachable: {type(exc).__name__}: {exc}"
                pool.failed(lease.endpoint)
            else:
                if resp.status_code == 200:
                    try:
                        fields = parse_reply(resp.json())
                    except (ValueError, KeyError, IndexError, TypeError) as exc:
                        problem = f"{lease.endpoint} sent a malformed reply: {exc!r}"
                        pool.failed(lease.endpoint)
                    else:
                        if lease.failures:
                            pool.succeeded(lease.endpoint)
                        return ModelReply(
                            **fields,
                            latency_s=time.monotonic() - started,
                            endpoint=lease.endpoint,
                            model_name=call.model_name,
                            policy_version=resp.headers.get("X-Policy-Version") or version,
                            attempts=attempts,
                        )
                else:
                    message, code = _error_message(resp)
                    problem = f"{lease.endpoint} answered {resp.status_code}: {message[:300]}"
                    if resp.status_code not in RETRY_STATUS:
                        if lease.failures:
                            pool.succeeded(lease.endpoint)  # it answered: the server is alive
                        low = f"{message} {code}".lower()
                        if any(m in low for m in CONTEXT_MARKERS):
                            raise ContextLengthError(f"context length exceeded for {call.model_name}: {message}")
                        raise ModelError(f"model request rejected ({resp.status_code}) by {lease.endpoint}: {message}")
                    if resp.status_code == 429:
                        retry_after = _retry_after(resp)  # overloaded, not unhealthy
                    else:
                        pool.failed(lease.endpoint)
            finally:
                pool.release(lease)
            delay = backoff_delay(attempt, s.model_backoff_base_s, s.model_backoff_max_s, retry_after)
            if attempt == s.model_max_retries or time.monotonic() + delay >= deadline:
                break
            log.warning("model request of %s step %s: %s; retry %d in %.2fs", request.session_id, request.step,
                        problem, attempt + 1, delay)
            time.sleep(delay)
        raise ModelUnavailableError(f"model {call.model_name!r} failed after {attempts} attempt(s): {problem}")
