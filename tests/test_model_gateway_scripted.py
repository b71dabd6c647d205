"""The deterministic ``scripted`` backend: replies in order, stateless, with accounting."""

from __future__ import annotations

import pytest

from megaflow.core.errors import ConfigError, ModelError
from megaflow.model_gateway import BACKENDS, ModelBackend, ModelRequest, load_backend


def request(n_assistant: int, replies, **kw) -> ModelRequest:
    msgs = [{"role": "system", "content": "sys prompt"}, {"role": "user", "content": "do the task"}]
    for i in range(n_assistant):
        msgs += [{"role": "assistant", "content": f"r{i}"}, {"role": "user", "content": "ok"}]
    return ModelRequest(messages=msgs, model={"replies": replies}, session_id="ep", step=n_assistant, **kw)


def test_replies_in_order_and_stateless():
    backend = load_backend("scripted", None)
    assert isinstance(backend, ModelBackend)
    replies = ["first", "second reply", "third"]
    assert [backend.complete(request(n, replies)).content for n in range(3)] == replies
    assert backend.complete(request(1, replies)).content == "second reply"  # a redelivery gets the same reply


def test_accounting_and_policy_version():
    reply = load_backend("scripted", None).complete(request(0, ["two words"], policy_version="v3"))
    assert (reply.prompt_tokens, reply.completion_tokens) == (5, 2)
    assert reply.policy_version == "v3" and reply.endpoint == "scripted" and reply.attempts == 1
    assert reply.to_json()["content"] == "two words"


def test_exhausted_and_missing_replies_are_model_errors():
    backend = load_backend("scripted", None)
    with pytest.raises(ModelError, match="exhausted"):
        backend.complete(request(2, ["only", "two"]))
    with pytest.raises(ModelError, match="model.replies"):
        backend.complete(ModelRequest(messages=[], model={}))


def test_unknown_backend_names_the_choices():
    assert set(BACKENDS) >= {"scripted", "openai"}
    with pytest.raises(ConfigError, match="openai"):
        load_backend("nope", None)
