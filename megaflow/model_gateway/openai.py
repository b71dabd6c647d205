"""The ``openai`` backend: any OpenAI-compatible chat-completions endpoint (vLLM, SGLang, llama.cpp, hosted APIs).

One call: choose an endpoint from the model's pool (sticky per episode, least outstanding,
healthy only, one concurrency slot), POST ``/chat/completions`` with every field the caller set
(streamed by default and reassembled), and classify what comes back:

- 200: the whole reply (message, tool calls, reasoning, usage, logprobs, token ids);
- 400 / 404 / 422 and any other non-retryable 4xx: :class:`ModelRequestError`, or
  :class:`ContextLengthError` for a context overflow; no retry, the endpoint stays healthy;
- 401 / 403: the batch stops using that endpoint (``model_auth_block_s``); the call moves to
  another endpoint, or raises :class:`ModelAuthError` when none is left;
- 408 / 409 / 429 / 5xx, connection errors, time-outs, a cut stream: retry with exponential
  backoff and jitter (``Retry-After`` honoured) inside ONE budget per call: at most
  ``model_max_retries + 1`` attempts and ``model_retry_budget_s`` seconds in all; then
  :class:`ModelUnavailableError` naming the endpoint and the last error (the episode ends as infra).

The fleet's key (``MEGAFLOW_MODEL_API_KEY``) goes only to endpoints an operator configured: those in
``MEGAFLOW_MODEL_ENDPOINTS`` and those registered by ``megaflow model serve``. An endpoint a task spec
names and nobody configured gets no Authorization header at all.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import redis
from pydantic import ValidationError

from megaflow.core.errors import ContextLengthError, ModelError, ModelUnavailableError, SpecError
from megaflow.core.keys import Keys
from megaflow.model_gateway.base import ModelReply, ModelRequest
from megaflow.model_gateway.errors import ModelAuthError, ModelRequestError
from megaflow.model_gateway.openai_config import OpenAIConfig
from megaflow.model_gateway.openai_wire import (
    IncompleteStream,
    StreamError,
    assemble_stream,
    error_message,
    is_context_overflow,
    is_request_error,
    parse_reply,
)
from megaflow.model_gateway.pool import EndpointPool, Lease
from megaflow.model_gateway.registry import normalize_url, registered_endpoints

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 409, 429})  # and every 5xx
AUTH_STATUS = frozenset({401, 403})


@dataclass
class ModelCall:
    """What one task spec's ``model`` section asks of the openai backend (validated)."""

    model_name: str
    endpoints: list[str]
    params: dict[str, Any] = field(default_factory=dict)
    policy_version: str | None = None
    stream: bool | None = None


def parse_model_section(section: dict[str, Any], settings: Any) -> ModelCall:
    """Validate a task spec's ``model`` section; raises SpecError naming the field (usable at submit)."""
    if not isinstance(section, dict):
        raise SpecError("model must be a mapping", field="model")
    try:
        config = OpenAIConfig.model_validate({**section, "backend": "openai"})
    except ValidationError as exc:
        err = exc.errors()[0]
        where = "model." + ".".join(str(p) for p in err["loc"])
        msg = (
            "unknown field; check the spelling or put it in model.extra_body"
            if err["type"] == "extra_forbidden"
            else err["msg"]
        )
        raise SpecError(f"{where}: {msg}", field=where) from None
    params = {**config.request_fields(), **config.extra_body}
    return ModelCall(
        config.model_name or settings.model_name,
        config.endpoint_list(settings.model_endpoints),
        params,
        config.policy_version,
        config.stream,
    )


def backoff_delay(attempt: int, base: float, cap: float, retry_after: float | None = None) -> float:
    """Exponential backoff with jitter: about ``base * 2**attempt`` (half of it random), at most ``cap``;
    a server's ``Retry-After`` raises it (still capped)."""
    delay = min(cap, base * (2**attempt)) * (0.5 + random.random() / 2)
    if retry_after:
        delay = max(delay, min(retry_after, cap))
    return delay


def _retry_after(resp: httpx.Response) -> float | None:
    try:
        return float(resp.headers.get("Retry-After", ""))
    except ValueError:
        return None


class _Retry(Exception):
    """One attempt failed in a way worth retrying (``unhealthy``: count it against the endpoint)."""

    def __init__(self, problem: str, *, unhealthy: bool = True, retry_after: float | None = None):
        self.problem, self.unhealthy, self.retry_after = problem, unhealthy, retry_after
        super().__init__(problem)


class _Denied(Exception):
    """The endpoint refused the credentials (401/403)."""


class OpenAIBackend:
    """Chat completions over HTTP with endpoint pools, one retry budget and error classes (see the module doc)."""

    config_model = OpenAIConfig

    def __init__(self, settings: Any, redis_client: Any = None):
        if redis_client is None:
            redis_client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
        self.settings = settings
        self.redis = redis_client
        self.keys = Keys(settings.key_prefix)
        # no default Authorization header: the key is added per request, for configured endpoints only
        self._configured = frozenset(normalize_url(u) for u in settings.model_endpoints)
        self._registered: dict[str, tuple[float, frozenset[str]]] = {}  # model -> (read at, URLs)
        self.http = httpx.Client(
            timeout=httpx.Timeout(settings.model_timeout_s, connect=min(10.0, settings.model_timeout_s)),
            limits=httpx.Limits(
                max_connections=None, max_keepalive_connections=max(64, 2 * settings.model_concurrency)
            ),
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
                self.redis,
                self.keys,
                model_name,
                endpoints,
                concurrency=s.endpoint_concurrency,
                lease_s=s.model_timeout_s + 30,  # a stream renews it as chunks come
                unhealthy_after=s.model_unhealthy_after,
                cooldown_s=s.model_cooldown_s,
                sticky_ttl_s=s.model_sticky_ttl_s,
                probe=lambda endpoint: self.probe(endpoint, model_name),
            )
        return pool

    def probe(self, endpoint: str, model_name: str | None = None) -> bool:
        """True if ``GET {endpoint}/models`` answers 200 within a few seconds."""
        try:
            resp = self.http.get(
                f"{endpoint}/models",
                headers=self.auth_headers(endpoint, model_name),
                timeout=min(5.0, self.settings.model_timeout_s),
            )
            return resp.status_code == 200
        except httpx.HTTPError:
            return False

    # --- credentials ------------------------------------------------------------------------------
    def trusted(self, endpoint: str, model_name: str | None) -> bool:
        """Whether an operator configured ``endpoint``: in settings, or registered by ``megaflow model serve``."""
        url = normalize_url(endpoint)
        if url in self._configured:
            return True
        if model_name is None:
            return False
        read_at, urls = self._registered.get(model_name, (0.0, frozenset()))
        if url not in urls and time.monotonic() - read_at > EndpointPool.refresh_s:
            try:
                urls = frozenset(registered_endpoints(self.redis, self.keys, model_name))
            except redis.RedisError:  # unknown: no key (the call then fails as denied, never leaks)
                return False
            self._registered[model_name] = (time.monotonic(), urls)
        return url in urls

    def auth_headers(self, endpoint: str, model_name: str | None) -> dict[str, str]:
        """``Authorization: Bearer <fleet key>`` for a configured endpoint, nothing for any other one."""
        key = self.settings.model_api_key
        if key is None or not self.trusted(endpoint, model_name):
            return {}
        return {"Authorization": f"Bearer {key.get_secret_value()}"}

    # --- the request ------------------------------------------------------------------------------
    def build_body(self, request: ModelRequest, call: ModelCall, version: str | None) -> dict[str, Any]:
        """The JSON body: model, messages, the section's fields, extra_body, then the call's own params."""
        body: dict[str, Any] = {"model": call.model_name, "messages": request.messages, **call.params, **request.params}
        metadata = {"session_id": str(request.session_id), "step": str(request.step)}
        if version:
            metadata["policy_version"] = version
        if "metadata" not in body:
            body["metadata"] = metadata
        elif body["metadata"] is None:  # {metadata: null}: for APIs that refuse it (without `store`)
            del body["metadata"]
        else:
            body["metadata"] = {**metadata, **body["metadata"]}
        if "stream" not in body:
            body["stream"] = self.settings.model_stream if call.stream is None else call.stream
        if body["stream"]:
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        else:
            body.pop("stream_options", None)
        if body.get("logprobs") and body.get("top_logprobs") is None:
            body["top_logprobs"] = 1  # some servers (llama.cpp) return no logprobs without it
        return body

    def complete(self, request: ModelRequest) -> ModelReply:
        s = self.settings
        try:
            call = parse_model_section(request.model, s)
        except SpecError as exc:  # submit should have caught it; at run time it ends the episode cleanly
            raise ModelRequestError(f"bad model section: {exc}") from None
        version = request.policy_version or call.policy_version or s.policy_version
        body = self.build_body(request, call, version)
        headers = {"X-Policy-Version": version} if version else {}
        pool = self.pool(call.model_name, call.endpoints)

        started = time.monotonic()
        deadline = started + s.model_retry_budget_s
        max_attempts = s.model_max_retries + 1  # transient failures only: a 401/403 moves on without counting
        problem, endpoint, attempts, failures = "no attempt made", "", 0, 0
        while failures < max_attempts:
            try:
                lease = pool.acquire(request.session_id, deadline, scope=request.batch_id)
            except redis.RedisError as exc:  # no slot can be taken: the step is retried later
                raise ModelUnavailableError(f"Redis unreachable while choosing a model endpoint: {exc}") from exc
            except ModelUnavailableError as exc:
                if not failures:
                    raise
                raise ModelUnavailableError(
                    f"model {call.model_name!r}: {exc}; last error after {attempts} attempt(s): {problem}"
                ) from None
            attempts += 1
            endpoint = lease.endpoint
            try:
                data, streamed, resp_headers = self._attempt(
                    pool, lease, body, {**headers, **self.auth_headers(lease.endpoint, call.model_name)}, deadline
                )
            except _Denied as exc:
                problem = str(exc)
                if not self.trusted(lease.endpoint, call.model_name):
                    problem += f" ({self._key_hint(lease.endpoint, call.model_name)})"
                try:
                    pool.deny(lease.endpoint, request.batch_id, problem, s.model_auth_block_s)
                except redis.RedisError:  # the refusal cannot be shared: end this call with it
                    raise ModelAuthError(f"{problem}; {self._key_hint(lease.endpoint, call.model_name)}") from None
                log.warning("model %s: %s; the batch stops using this endpoint", call.model_name, problem)
                continue  # another endpoint, at once; acquire raises ModelAuthError when none is left
            except _Retry as exc:
                problem = exc.problem
                if exc.unhealthy:
                    pool.failed(lease.endpoint)
                delay = backoff_delay(failures, s.model_backoff_base_s, s.model_backoff_max_s, exc.retry_after)
                failures += 1
                if failures >= max_attempts or time.monotonic() + delay >= deadline:
                    break
                log.warning(
                    "model request of %s step %s: %s; retry %d in %.2fs",
                    request.session_id,
                    request.step,
                    problem,
                    failures,
                    delay,
                )
                time.sleep(delay)
                continue
            finally:
                pool.release(lease)
            if lease.failures:
                pool.succeeded(lease.endpoint)
            return ModelReply(
                **data,
                latency_s=time.monotonic() - started,
                endpoint=lease.endpoint,
                model_name=call.model_name,
                policy_version=resp_headers.get("X-Policy-Version") or version,
                attempts=attempts,
                streamed=streamed,
            )
        raise ModelUnavailableError(
            f"model {call.model_name!r}: retry budget spent ({attempts} attempt(s), at most {max_attempts}, "
            f"{time.monotonic() - started:.1f}s of {s.model_retry_budget_s:.0f}s); "
            f"last error from {endpoint}: {problem}"
        )

    def _key_hint(self, endpoint: str, model_name: str) -> str:
        if self.trusted(endpoint, model_name):
            return "check MEGAFLOW_MODEL_API_KEY"
        return "the fleet's key goes only to MEGAFLOW_MODEL_ENDPOINTS and registered model hosts; add this one there"

    # --- one attempt ------------------------------------------------------------------------------
    @contextmanager
    def _post(
        self, url: str, body: dict[str, Any], headers: dict[str, str], timeout: float, fresh: bool
    ) -> Iterator[httpx.Response]:
        if not fresh:
            with self.http.stream("POST", url, json=body, headers=headers, timeout=timeout) as resp:
                yield resp
            return
        # a connection of its own: the pooled one may be the one a failing server just broke
        with (
            httpx.Client(headers=self.http.headers) as client,
            client.stream("POST", url, json=body, headers=headers, timeout=timeout) as resp,
        ):
            yield resp

    def _unstreamed(
        self, pool: EndpointPool, lease: Lease, body: dict[str, Any], headers: dict[str, str], deadline: float
    ) -> tuple[dict[str, Any], bool, httpx.Headers]:
        """The same request, not streamed, on a fresh connection. A server that fails before its first
        event says nothing in a stream (llama-cpp-python's drops it on a context overflow); asked once
        unstreamed it answers the error (or fails again, and the attempt is retried as usual)."""
        plain = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        return self._attempt(pool, lease, {**plain, "stream": False}, headers, deadline, fresh=True)

    def _attempt(
        self,
        pool: EndpointPool,
        lease: Lease,
        body: dict[str, Any],
        headers: dict[str, str],
        deadline: float,
        fresh: bool = False,
    ) -> tuple[dict[str, Any], bool, httpx.Headers]:
        """POST once; the reply's fields, or _Retry / _Denied / a final ModelError."""
        ep = lease.endpoint
        timeout = max(0.1, min(self.settings.model_timeout_s, deadline - time.monotonic()))
        try:
            with self._post(f"{ep}/chat/completions", body, headers, timeout, fresh) as resp:
                if resp.status_code != 200:
                    resp.read()
                    self._classify(ep, resp)
                streamed = "text/event-stream" in resp.headers.get("content-type", "")
                if streamed:
                    try:
                        data = assemble_stream(self._lines(resp, deadline, pool, lease))
                    except IncompleteStream as exc:
                        if exc.events or not body.get("stream"):
                            raise
                        return self._unstreamed(pool, lease, body, headers, deadline)
                else:
                    resp.read()
                    data = resp.json()
                fields = parse_reply(data)
                return fields, streamed, resp.headers
        except httpx.TimeoutException:
            raise _Retry(f"{ep} timed out (no data for {timeout:.1f}s)") from None
        except httpx.TransportError as exc:
            raise _Retry(f"{ep} unreachable or cut off: {type(exc).__name__}: {exc}") from None
        except StreamError as exc:
            self._classify_error(ep, exc.status, exc.message, exc.code, None)
            raise  # not reached: _classify_error always raises
        except IncompleteStream as exc:
            raise _Retry(f"{ep}: {exc}") from None
        except ModelError:
            raise  # classified already (ModelRequestError is also a ValueError)
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise _Retry(f"{ep} sent a malformed reply: {exc!r}") from None

    def _lines(self, resp: httpx.Response, deadline: float, pool: EndpointPool, lease: Lease) -> Iterator[str]:
        """The stream's lines, renewing the endpoint slot's lease as they come, up to the budget's deadline."""
        renew_every = max(0.5, self.settings.model_timeout_s / 3)
        renewed = time.monotonic()
        for line in resp.iter_lines():
            now = time.monotonic()
            if now > deadline:
                raise _Retry(f"{resp.request.url} stream still going when the retry budget ran out", unhealthy=False)
            if now - renewed > renew_every:
                pool.renew(lease)
                renewed = now
            yield line

    def _classify(self, ep: str, resp: httpx.Response) -> None:
        try:
            body = resp.json()
        except ValueError:
            body = None
        message, code = error_message(body, resp.text)
        self._classify_error(ep, resp.status_code, message, code, resp)

    def _classify_error(self, ep: str, status: int, message: str, code: str, resp: httpx.Response | None) -> None:
        """Raise what a failed answer means (always raises)."""
        problem = f"{ep} answered {status}: {message[:300]}"
        if status in AUTH_STATUS:
            raise _Denied(f"{ep} refused the credentials ({status}): {message[:300]}")
        if is_context_overflow(message, code):
            raise ContextLengthError(f"context length exceeded ({status} from {ep}): {message}")
        if status in RETRY_STATUS or (status >= 500 and not is_request_error(message, code)):
            retry_after = _retry_after(resp) if resp is not None and status in (429, 503) else None
            raise _Retry(problem, unhealthy=status != 429, retry_after=retry_after)
        raise ModelRequestError(f"model request rejected ({status}) by {ep}: {message}", status=status, endpoint=ep)
