"""The openai backend against real OpenAI-compatible servers on loopback, with a real Redis.

Balancing, stickiness, concurrency limits, retries, error classes, health and probing, token
accounting, logprobs and token ids, policy versions, dynamic registration.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
from openai_server import OpenAIServer

from megaflow.core.errors import ContextLengthError, ModelError, ModelUnavailableError, RetryableError, SpecError
from megaflow.core.keys import Keys
from megaflow.model_gateway import ModelRequest, load_backend
from megaflow.model_gateway.openai import backoff_delay, parse_model_section
from megaflow.model_gateway.registry import deregister_endpoint, register_endpoint, registered_endpoints
from tests.helpers import wait_until


@pytest.fixture
def two_servers():
    with OpenAIServer("a") as a, OpenAIServer("b") as b:
        yield a, b


def make_backend(settings, redis_client, endpoints, **overrides):
    fast = {
        "model_backend": "openai",
        "model_name": "test-model",
        "model_endpoints": endpoints,
        "model_backoff_base_s": 0.01,
        "model_backoff_max_s": 0.05,
        "model_timeout_s": 5.0,
        "model_max_retries": 3,
        "model_unhealthy_after": 2,
        "model_cooldown_s": 0.3,
        "model_retry_budget_s": 10.0,
    }
    fast.update(overrides)
    return load_backend("openai", settings.model_copy(update=fast), redis_client)


def ask(backend, session="ep-1", text="hello world", step=0, **model):
    return backend.complete(
        ModelRequest(
            messages=[{"role": "system", "content": "you are a test"}, {"role": "user", "content": text}],
            model=model,
            session_id=session,
            step=step,
            policy_version=model.pop("pv", None),
        )
    )


# --- one call: reply, accounting, policy version --------------------------------------------------
def test_reply_carries_tokens_latency_endpoint_and_policy_version(settings, redis_client, two_servers):
    a, _ = two_servers
    backend = make_backend(settings, redis_client, [a.base_url])
    reply = ask(backend, text="fix the bug please", pv="policy-42", temperature=0.0, max_tokens=64)
    assert reply.content == "a says: fix the bug please"
    assert (reply.prompt_tokens, reply.completion_tokens) == (4 + 4, 6)
    assert reply.latency_s > 0 and reply.attempts == 1 and reply.finish_reason == "stop"
    assert reply.endpoint == a.base_url and reply.model_name == "test-model"
    assert reply.policy_version == "policy-42"
    sent = a.requests[-1]
    assert sent["headers"]["x-policy-version"] == "policy-42"
    assert sent["body"]["metadata"] == {"session_id": "ep-1", "step": "0", "policy_version": "policy-42"}
    assert sent["body"]["model"] == "test-model" and sent["body"]["temperature"] == 0.0
    assert reply.token_ids is None and reply.logprobs is None  # not asked for


def test_server_policy_version_header_wins_and_settings_default(settings, redis_client, two_servers):
    a, _ = two_servers
    backend = make_backend(settings, redis_client, [a.base_url], policy_version="v-settings")
    assert ask(backend).policy_version == "v-settings"
    a.policy_version = "v-served"  # what the server actually runs (a trainer pushed new weights)
    assert ask(backend).policy_version == "v-served"


def test_logprobs_and_token_ids_are_kept(settings, redis_client, two_servers):
    a, _ = two_servers
    backend = make_backend(settings, redis_client, [a.base_url])
    reply = ask(
        backend,
        text="one two three",
        logprobs=True,
        extra_body={"return_tokens_as_token_ids": True, "return_token_ids": True},
    )
    assert reply.completion_tokens == 5
    assert reply.logprobs == pytest.approx([-0.05, -0.1, -0.15, -0.2, -0.25])
    assert len(reply.token_ids) == 5 and all(isinstance(t, int) for t in reply.token_ids)
    assert len(reply.prompt_token_ids) == reply.prompt_tokens
    plain = ask(backend, text="one two three", logprobs=True)  # text tokens: logprobs only
    assert plain.logprobs is not None and plain.token_ids is None
    assert reply.to_json()["token_ids"] == reply.token_ids  # JSON-ready for the trajectory


def test_max_tokens_truncation_reports_length(settings, redis_client, two_servers):
    a, _ = two_servers
    backend = make_backend(settings, redis_client, [a.base_url])
    reply = ask(backend, text="a b c d e f", max_tokens=3)
    assert reply.finish_reason == "length" and reply.completion_tokens == 3


# --- balancing, stickiness, limits ------------------------------------------------------------------
def test_sessions_stick_and_spread_over_endpoints(settings, redis_client, two_servers):
    a, b = two_servers
    backend = make_backend(settings, redis_client, [a.base_url, b.base_url])
    seen: dict[str, set[str]] = {}
    for round_ in range(3):
        for i in range(12):
            reply = ask(backend, session=f"ep-{i}", step=round_)
            seen.setdefault(f"ep-{i}", set()).add(reply.endpoint)
    assert all(len(v) == 1 for v in seen.values()), seen  # every episode kept its endpoint
    assert a.sessions() and b.sessions() and not (a.sessions() & b.sessions())
    sticky = redis_client.get(Keys().model("sticky", "test-model", "ep-0"))
    assert sticky in (a.base_url, b.base_url) and redis_client.pttl(Keys().model("sticky", "test-model", "ep-0")) > 0


def test_least_outstanding_picks_the_idle_endpoint(settings, redis_client, two_servers):
    a, b = two_servers
    backend = make_backend(settings, redis_client, [a.base_url, b.base_url])
    pool = backend.pool("test-model", [a.base_url, b.base_url])
    for i in range(3):  # three requests in flight on a (held by other workers)
        assert pool.semaphore(a.base_url).acquire(f"other-{i}")
    assert {ask(backend, session=f"new-{i}").endpoint for i in range(5)} == {b.base_url}


def test_concurrency_limit_per_endpoint_holds_under_load(settings, redis_client, two_servers):
    a, b = two_servers
    a.delay_s = b.delay_s = 0.15
    backend = make_backend(settings, redis_client, [a.base_url, b.base_url], endpoint_concurrency=2)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            ask(backend, session=f"load-{i}")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert a.answered + b.answered == 10
    assert a.peak <= 2 and b.peak <= 2  # the Redis semaphore kept each server at its limit
    pool = backend.pool("test-model", [a.base_url, b.base_url])
    assert all(row["outstanding"] == 0 for row in pool.status())  # every slot given back


def test_full_endpoints_time_out_as_unavailable(settings, redis_client, two_servers):
    a, _ = two_servers
    backend = make_backend(
        settings,
        redis_client,
        [a.base_url],
        endpoint_concurrency=1,
        model_timeout_s=0.2,
        model_max_retries=0,
        model_retry_budget_s=0.2,
    )
    assert backend.pool("test-model", [a.base_url]).semaphore(a.base_url).acquire("someone-else")
    with pytest.raises(ModelUnavailableError, match="concurrency limit"):
        ask(backend)
    assert a.received == 0


# --- failures: retries and error classes ----------------------------------------------------------
@pytest.mark.parametrize("kind", ["429", "500", "503", "drop"])
def test_transient_failures_are_retried(settings, redis_client, two_servers, kind):
    a, _ = two_servers
    backend = make_backend(settings, redis_client, [a.base_url], model_unhealthy_after=5)
    a.inject(kind, 2)
    reply = ask(backend)
    assert reply.attempts == 3 and reply.content.startswith("a says")
    assert a.received == 3
    assert not redis_client.hget(Keys().model("fails", "test-model"), a.base_url)  # the run of failures ended


def test_timeout_is_retried(settings, redis_client, two_servers):
    a, _ = two_servers
    a.slow_s = 5.0
    backend = make_backend(settings, redis_client, [a.base_url], model_timeout_s=1.5)  # answered in time when loaded
    a.inject("slow", 1)
    reply = ask(backend)
    assert reply.attempts == 2 and a.received == 2


def test_retries_exhausted_raise_a_retryable_error(settings, redis_client, two_servers):
    a, _ = two_servers
    backend = make_backend(settings, redis_client, [a.base_url], model_max_retries=2, model_unhealthy_after=10)
    a.inject("500", 10)
    with pytest.raises(ModelUnavailableError, match="3 attempt") as info:
        ask(backend)
    assert isinstance(info.value, RetryableError) and isinstance(info.value, ModelError)
    assert a.received == 3


def test_request_errors_are_not_retried(settings, redis_client, two_servers):
    a, _ = two_servers
    backend = make_backend(settings, redis_client, [a.base_url])
    a.inject("400", 1)
    with pytest.raises(ModelError, match="rejected") as info:
        ask(backend)
    assert not isinstance(info.value, (RetryableError, ContextLengthError))
    assert a.received == 1


def test_context_overflow_is_its_own_error(settings, redis_client, two_servers):
    a, _ = two_servers
    backend = make_backend(settings, redis_client, [a.base_url])
    a.inject("context", 1)
    with pytest.raises(ContextLengthError, match="maximum context length") as info:
        ask(backend)
    assert not isinstance(info.value, RetryableError)
    assert a.received == 1


def test_backoff_grows_with_jitter_and_honours_retry_after():
    delays = [backoff_delay(n, 0.5, 8.0) for n in range(6)]
    assert 0.25 <= delays[0] <= 0.5 and 4.0 <= delays[5] <= 8.0
    assert backoff_delay(0, 0.5, 8.0, retry_after=3.0) >= 3.0
    assert backoff_delay(0, 0.5, 8.0, retry_after=60.0) <= 8.0


# --- health: out after failures, probed back in -----------------------------------------------------
def test_unhealthy_endpoint_is_taken_out_and_probed_back(settings, redis_client, two_servers):
    a, b = two_servers
    backend = make_backend(settings, redis_client, [a.base_url, b.base_url])
    pool = backend.pool("test-model", [a.base_url, b.base_url])
    redis_client.set(pool.sticky_key("ep-b"), b.base_url)  # this episode lives on b
    b.down = True
    for step in range(3):  # b fails twice -> out; the retries and later calls go to a
        assert ask(backend, session="ep-b", step=step).endpoint == a.base_url
    assert {r["endpoint"]: r["healthy"] for r in pool.status()} == {a.base_url: True, b.base_url: False}
    assert redis_client.get(pool.sticky_key("ep-b")) == a.base_url  # the episode moved with its endpoint
    b.down = False
    # past the cool-down (0.3 s) a choice probes b: calls go on (to a) until one has
    wait_until(lambda: ask(backend, session="fresh") and b.probes >= 1, 30, "a probe of b after its cool-down")
    assert all(r["healthy"] for r in pool.status())


def test_unreachable_endpoint_fails_over(settings, redis_client, two_servers):
    a, _ = two_servers
    from conftest import free_port

    dead = f"http://127.0.0.1:{free_port()}/v1"
    # a long cool-down: the dead endpoint stays out while the test looks (a slow machine passes 0.3 s)
    backend = make_backend(settings, redis_client, [dead, a.base_url], model_cooldown_s=60.0)
    pool = backend.pool("test-model", [dead, a.base_url])
    asked = 0

    def dead_is_out() -> bool:  # ties are broken at random: ask until the dead one was tried enough
        nonlocal asked
        asked += 1
        assert ask(backend, session=f"s{asked}").endpoint == a.base_url  # every call answered, by a
        return {r["endpoint"]: r["healthy"] for r in pool.status()}[dead] is False

    wait_until(dead_is_out, 30, "the dead endpoint to be taken out", 0)
    assert ask(backend, session="after").endpoint == a.base_url


def test_all_endpoints_down_is_unavailable(settings, redis_client, two_servers):
    a, _ = two_servers
    a.down = True
    backend = make_backend(settings, redis_client, [a.base_url], model_max_retries=4, model_cooldown_s=0.2)
    started = time.monotonic()
    with pytest.raises(ModelUnavailableError):
        ask(backend)
    assert time.monotonic() - started < 5


# --- configuration ------------------------------------------------------------------------------------
def test_spec_endpoints_override_settings(settings, redis_client, two_servers):
    a, b = two_servers
    backend = make_backend(settings, redis_client, [a.base_url])
    assert ask(backend, base_url=b.base_url).endpoint == b.base_url
    assert ask(backend, session="x", endpoints=[b.base_url], model_name="other").model_name == "other"


def test_no_endpoints_is_a_clear_error(settings, redis_client):
    backend = make_backend(settings, redis_client, [])
    with pytest.raises(ModelUnavailableError, match="MEGAFLOW_MODEL_ENDPOINTS"):
        ask(backend)


def test_bad_model_section_names_the_field(settings, redis_client):
    with pytest.raises(SpecError) as info:
        parse_model_section({"temperature": "hot"}, settings)
    assert info.value.field == "model.temperature"
    with pytest.raises(SpecError, match="unknown field"):
        parse_model_section({"temprature": 0.1}, settings)
    with pytest.raises(SpecError) as info:
        parse_model_section({"endpoints": "gpu1:8000"}, settings)
    assert info.value.field == "model.endpoints"
    backend = make_backend(settings, redis_client, ["http://127.0.0.1:9/v1"])
    with pytest.raises(ModelError, match="bad model section"):  # at run time: a clean model error
        ask(backend, temperature="hot")


def test_registered_endpoints_join_and_expire(settings, redis_client, two_servers):
    a, b = two_servers
    keys = Keys()
    backend = make_backend(settings, redis_client, [])
    register_endpoint(redis_client, keys, "test-model", b.base_url + "/", ttl=30)
    assert registered_endpoints(redis_client, keys, "test-model") == [b.base_url]
    assert ask(backend).endpoint == b.base_url
    deregister_endpoint(redis_client, keys, "test-model", b.base_url)
    register_endpoint(redis_client, keys, "test-model", f"http://127.0.0.1:{a.port}", ttl=0.2)  # /v1 added
    assert registered_endpoints(redis_client, keys, "test-model") == [a.base_url]
    wait_until(lambda: registered_endpoints(redis_client, keys, "test-model") == [], 10, "the 0.2 s TTL to expire it")


def test_openai_backend_module_loads_only_when_chosen():
    code = (
        "import sys; from megaflow.model_gateway import load_backend; from megaflow.core.settings import Settings; "
        "load_backend('scripted', Settings.load()); "
        "assert 'megaflow.model_gateway.openai' not in sys.modules and 'httpx' not in sys.modules, 'eager'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_error_bodies_of_every_server_shape_are_read():
    from megaflow.model_gateway.openai_wire import error_message

    legacy = {
        "object": "error",
        "message": "This model's maximum context length is 8",
        "type": "BadRequestError",
        "code": 400,
    }
    openai = {"error": {"message": "too long", "code": "context_length_exceeded"}}
    fastapi = {"detail": [{"loc": ["body", "temperature"], "msg": "Input should be a valid number"}]}
    assert error_message(legacy)[0].startswith("This model's maximum context length")
    assert error_message(openai) == ("too long", "context_length_exceeded")
    assert error_message(None, "<html>bad gateway</html>") == ("<html>bad gateway</html>", "")
    assert "temperature" in error_message(fastapi)[0]


def test_redis_outage_is_a_retryable_model_error(settings, two_servers):
    import redis
    from conftest import free_port

    a, _ = two_servers
    dead_redis = redis.Redis(port=free_port(), socket_connect_timeout=0.2, socket_timeout=0.2)
    backend = load_backend("openai", settings.model_copy(update={"model_endpoints": [a.base_url]}), dead_redis)
    with pytest.raises(ModelUnavailableError, match="Redis unreachable") as info:
        ask(backend)
    assert isinstance(info.value, RetryableError)
