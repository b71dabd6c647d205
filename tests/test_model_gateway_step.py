"""The model step over real Redis and the scripted OpenAI server: the whole reply on the history,
per-call fields from the agent, and every model error class ending the episode with its cause."""

from __future__ import annotations

import json

import pytest
from openai_server import OpenAIServer

from megaflow.core import states
from megaflow.core.spec import validate_specs
from megaflow.services.model import model_step
from megaflow.services.root import Root as Runtime

TOOLS = [{"type": "function", "function": {"name": "bash", "parameters": {"type": "object", "properties": {}}}}]


@pytest.fixture
def server():
    with OpenAIServer("a") as a:
        yield a


@pytest.fixture
def rt(settings, server):
    fast = {
        "model_backend": "openai",
        "model_name": "test-model",
        "model_endpoints": [server.base_url],
        "model_backoff_base_s": 0.01,
        "model_backoff_max_s": 0.02,
        "model_max_retries": 1,
        "model_retry_budget_s": 10.0,
    }
    runtime = Runtime(settings.model_copy(update=fast))
    yield runtime
    runtime.redis.close()


def episodes(rt, n, **model):
    specs = validate_specs(
        [
            {
                "task_id": f"t{i}",
                "eval": {"command": "true"},
                "policy_version": "v7",
                "model": {"backend": "openai", **model},
            }
            for i in range(n)
        ]
    )
    _, ids = rt.engine.create_batch(specs, "alice")
    for eid in ids:  # the agent's first messages
        rt.engine.advance(
            rt.engine.load(eid),
            history=[{"role": "system", "content": "sys"}, {"role": "user", "content": "fix it", "kind": "task"}],
        )
    return ids


def test_the_whole_reply_goes_on_the_history(rt, server):
    (eid,) = episodes(rt, 1, tools=TOOLS, logprobs=True)
    server.tool_call = {"name": "bash", "arguments": "{}"}
    rt.redis.hset(rt.keys.episode(eid), "model_params", json.dumps({"tool_choice": "required"}))
    ep = rt.engine.load(eid)
    assert model_step(rt, eid, ep.step) == "ok"
    body = server.requests[-1]["body"]
    assert body["messages"] == [{"role": "system", "content": "sys"}, {"role": "user", "content": "fix it"}]
    assert body["tools"] == TOOLS and body["tool_choice"] == "required" and body["logprobs"] is True
    record = rt.engine.load(eid).history[-1]
    assert record["role"] == "assistant" and record["tool_calls"][0]["function"]["name"] == "bash"
    assert record["finish_reason"] == "tool_calls" and record["endpoint"] == server.base_url
    assert record["latency_s"] > 0 and record["usage"]["completion_tokens"] == record["completion_tokens"]
    assert record["streamed"] is True and record["policy_version"] == "v7"


def test_cache_marks_reach_the_server_as_mini_swe_agent_sets_them(rt, server):
    """``cache_control: default_end`` (mini-swe-agent's Anthropic configs): the last message carries the
    mark, on the message itself for a tool message, and the model step sends it as the agent set it."""
    (eid,) = episodes(rt, 1)
    ep = rt.engine.load(eid)
    call = {"id": "c1", "type": "function", "function": {"name": "bash", "arguments": "{}"}}
    rt.engine.advance(
        ep,
        history=[
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": "obs", "tool_call_id": "c1"},
        ],
    )
    rt.redis.hset(rt.keys.episode(eid), "agent_request", json.dumps({"cache_control": "default_end"}))
    assert model_step(rt, eid, rt.engine.load(eid).step) == "ok"
    body = server.requests[-1]["body"]
    assert "cache_control" not in body
    assert body["messages"][-1] == {
        "role": "tool",
        "content": [{"type": "text", "text": "obs"}],
        "tool_call_id": "c1",
        "cache_control": {"type": "ephemeral"},
    }
    assert body["messages"][:2] == [{"role": "system", "content": "sys"}, {"role": "user", "content": "fix it"}]


@pytest.mark.parametrize(
    ("fault", "cause"),
    [
        ("400", "model_request"),
        ("422", "model_request"),
        ("context", "context_length"),
        ("401", "model_auth"),
        ("503", "infra"),
    ],
)
def test_each_error_class_ends_the_episode_with_its_cause(rt, server, fault, cause):
    (eid,) = episodes(rt, 1)
    server.inject(fault, 5)
    assert model_step(rt, eid, rt.engine.load(eid).step) == cause
    ep = rt.engine.load(eid)
    assert ep.state == states.FAILED and ep.fields["cause"] == cause
    assert server.base_url in ep.fields["error"]
    assert server.received == (2 if fault == "503" else 1)  # one budget: max_retries 1 -> 2 attempts, no more
