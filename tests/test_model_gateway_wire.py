"""The pass-through seam and model errors by class, against the scripted OpenAI server on loopback.

Every field a caller sets reaches the server; the whole reply comes back (tool calls, reasoning,
usage, logprobs, token ids), streamed or not; each error class ends in its own cause, with one
retry budget per call; backends validate their own spec sections.
"""

from __future__ import annotations

import json

import pytest
from openai_server import OpenAIServer

from megaflow.core.errors import ContextLengthError, ModelUnavailableError, SpecError
from megaflow.core.keys import Keys
from megaflow.model_gateway import ModelReply, ModelRequest, chat_message, load_backend, validate_model_section
from megaflow.model_gateway.base import BackendConfig
from megaflow.model_gateway.errors import ModelAuthError, ModelRequestError, cause_of

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "bash",
            "description": "Run a command",
            "parameters": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]},
        },
    }
]


@pytest.fixture
def srv():
    with OpenAIServer("a") as a, OpenAIServer("b") as b:
        yield a, b


def backend_for(settings, redis_client, endpoints, **overrides):
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


def ask(backend, messages=None, *, batch="batch-1", session="ep-1", params=None, **model):
    messages = messages or [{"role": "user", "content": "hello there world"}]
    return backend.complete(
        ModelRequest(messages=messages, model=model, session_id=session, step=0, batch_id=batch, params=params or {})
    )


# --- requests pass through whole ------------------------------------------------------------------
def test_every_field_the_caller_sets_reaches_the_server(settings, redis_client, srv):
    a, _ = srv
    backend = backend_for(settings, redis_client, [a.base_url])
    ask(
        backend,
        tools=TOOLS,
        tool_choice="auto",
        parallel_tool_calls=False,
        stop=["\n\n"],
        seed=7,
        n=1,
        response_format={"type": "json_object"},
        logprobs=True,
        top_logprobs=3,
        top_k=20,
        temperature=0.5,
        return_tokens_as_token_ids=True,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}, "foo": 1},
        params={"user": "agent-7"},
    )
    body = a.requests[-1]["body"]
    assert body["tools"] == TOOLS and body["tool_choice"] == "auto" and body["parallel_tool_calls"] is False
    assert (body["stop"], body["seed"], body["n"], body["response_format"]) == (["\n\n"], 7, 1, {"type": "json_object"})
    assert (body["logprobs"], body["top_logprobs"], body["top_k"], body["temperature"]) == (True, 3, 20, 0.5)
    assert body["return_tokens_as_token_ids"] is True and body["foo"] == 1
    assert body["chat_template_kwargs"] == {"enable_thinking": False} and body["user"] == "agent-7"
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}  # streamed by default
    assert "replies" not in body and "backend" not in body and "extra_body" not in body


def test_history_messages_keep_tool_calls_ids_and_names(settings, redis_client, srv):
    a, _ = srv
    call = {"id": "call_1", "type": "function", "function": {"name": "bash", "arguments": '{"command": "ls"}'}}
    history = [
        {"role": "system", "content": "sys", "step": 0},
        {"role": "user", "content": "go", "name": "alice"},
        {"role": "assistant", "content": "", "tool_calls": [call], "step": 1, "latency_s": 0.2, "endpoint": "x"},
        {"role": "tool", "content": "file.txt", "tool_call_id": "call_1", "kind": "observation"},
        {"role": "assistant", "content": "done", "tool_calls": [], "function_call": None},
    ]
    sent = [chat_message(m) for m in history]
    assert sent[2] == {"role": "assistant", "content": "", "tool_calls": [call]}
    assert sent[3] == {"role": "tool", "content": "file.txt", "tool_call_id": "call_1"}
    assert sent[1]["name"] == "alice" and sent[4] == {"role": "assistant", "content": "done"}
    backend = backend_for(settings, redis_client, [a.base_url])
    ask(backend, sent)
    assert a.requests[-1]["body"]["messages"] == sent


# --- replies come back whole ----------------------------------------------------------------------
@pytest.mark.parametrize("stream", [True, False])
def test_reply_keeps_content_usage_logprobs_and_token_ids(settings, redis_client, srv, stream):
    a, _ = srv
    a.reasoning = "think first"
    backend = backend_for(settings, redis_client, [a.base_url])
    reply = ask(backend, stream=stream, logprobs=True, return_token_ids=True)
    assert reply.streamed is stream
    assert reply.content == "a says: hello there world" and reply.finish_reason == "stop"
    assert reply.reasoning_content.strip() == "think first"
    assert reply.usage == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    assert (reply.prompt_tokens, reply.completion_tokens) == (3, 5)
    assert reply.logprobs == pytest.approx([-0.05, -0.1, -0.15, -0.2, -0.25])
    assert [c["token"] for c in reply.logprobs_content] == reply.content.split()
    assert len(reply.token_ids) == 5 and len(reply.prompt_token_ids) == 3
    assert a.requests[-1]["body"]["top_logprobs"] == 1  # logprobs alone: servers such as llama.cpp need it


@pytest.mark.parametrize("stream", [True, False])
def test_tool_calls_come_back_whole(settings, redis_client, srv, stream):
    a, _ = srv
    a.tool_call = {"name": "bash", "arguments": json.dumps({"command": "ls -la /repo"})}
    backend = backend_for(settings, redis_client, [a.base_url])
    reply = ask(backend, stream=stream, tools=TOOLS)
    assert reply.finish_reason == "tool_calls" and reply.content == ""
    assert reply.tool_calls == [
        {"id": "call_1", "type": "function", "function": {"name": "bash", "arguments": '{"command": "ls -la /repo"}'}}
    ]
    record = reply.history_record(step=3)
    assert record["tool_calls"] == reply.tool_calls and record["step"] == 3 and record["endpoint"] == a.base_url
    assert chat_message(record) == {"role": "assistant", "content": "", "tool_calls": reply.tool_calls}


def test_a_stream_slower_than_the_read_timeout_in_total_completes(settings, redis_client, srv):
    a, _ = srv
    a.chunk_delay_s = 0.35  # 8 events: 2.8 s in all, each gap well under the 1.5 s time-out
    backend = backend_for(settings, redis_client, [a.base_url], model_timeout_s=1.5)
    reply = ask(backend, [{"role": "user", "content": "one two three four"}])
    assert reply.streamed and reply.attempts == 1 and reply.content == "a says: one two three four"


def test_a_stream_cut_half_way_is_retried(settings, redis_client, srv):
    a, _ = srv
    a.inject("cut", 1)
    reply = ask(backend_for(settings, redis_client, [a.base_url]))
    assert reply.attempts == 2 and reply.content.startswith("a says")


# --- errors by class --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["400", "404", "422", "500_validation", "stream_error"])
def test_request_errors_end_without_retry_and_keep_the_endpoint_healthy(settings, redis_client, srv, kind):
    a, _ = srv
    backend = backend_for(settings, redis_client, [a.base_url], model_unhealthy_after=1)
    a.inject(kind, 1)
    with pytest.raises(ModelRequestError) as info:
        ask(backend)
    assert cause_of(info.value) == "model_request" and a.received == 1
    assert a.base_url in str(info.value)
    assert all(row["healthy"] for row in backend.pool("test-model", [a.base_url]).status())


def test_context_overflow_keeps_its_cause(settings, redis_client, srv):
    a, _ = srv
    a.inject("context", 1)
    with pytest.raises(ContextLengthError) as info:
        ask(backend_for(settings, redis_client, [a.base_url]))
    assert cause_of(info.value) == "context_length" and a.received == 1


@pytest.mark.parametrize("kind", ["401", "403"])
def test_refused_credentials_stop_the_batch_using_that_endpoint(settings, redis_client, srv, kind):
    a, b = srv
    backend = backend_for(settings, redis_client, [a.base_url, b.base_url])
    pool = backend.pool("test-model", [a.base_url, b.base_url])
    redis_client.set(pool.sticky_key("ep-1"), a.base_url)
    a.inject(kind, 5)
    reply = ask(backend)  # a refuses: the call moves on to b at once
    assert reply.endpoint == b.base_url and a.received == 1
    for i in range(3):  # the rest of the batch never goes back to a
        assert ask(backend, session=f"ep-{i + 2}").endpoint == b.base_url
    assert a.received == 1
    assert ask(backend, batch="other", session="x").endpoint in (a.base_url, b.base_url)  # other batches may try


def test_refused_credentials_everywhere_is_a_clear_auth_error(settings, redis_client, srv):
    a, _ = srv
    backend = backend_for(settings, redis_client, [a.base_url])
    a.inject("401", 5)
    with pytest.raises(ModelAuthError, match="MEGAFLOW_MODEL_API_KEY") as info:
        ask(backend)
    assert cause_of(info.value) == "model_auth" and "401" in str(info.value)
    with pytest.raises(ModelAuthError):  # the next episode of the batch does not even send
        ask(backend, session="ep-2")
    assert a.received == 1
    assert redis_client.pttl(Keys().model("denied", "test-model", "batch-1")) > 0


def test_transient_errors_share_one_budget_of_attempts(settings, redis_client, srv):
    a, _ = srv
    backend = backend_for(settings, redis_client, [a.base_url], model_max_retries=2, model_unhealthy_after=10)
    a.inject("503", 10)
    with pytest.raises(ModelUnavailableError) as info:
        ask(backend)
    assert a.received == 3 and cause_of(info.value) == "infra"
    assert "retry budget spent" in str(info.value) and a.base_url in str(info.value) and "503" in str(info.value)


def test_transient_errors_share_one_budget_of_seconds(settings, redis_client, srv):
    a, _ = srv
    a.slow_s = 2.0
    backend = backend_for(
        settings,
        redis_client,
        [a.base_url],
        model_timeout_s=0.3,
        model_retry_budget_s=0.8,
        model_max_retries=50,
        model_unhealthy_after=100,
    )
    a.inject("slow", 50)
    with pytest.raises(ModelUnavailableError, match="timed out") as info:
        ask(backend)
    assert 1 <= a.received < 10 and "retry budget spent" in str(info.value)


# --- each backend validates its own section ----------------------------------------------------------
def test_sections_are_validated_by_their_backend():
    assert validate_model_section({"backend": "openai", "temperature": 0.2, "tools": TOOLS}).tools == TOOLS
    assert validate_model_section({"replies": ["a", {"content": "", "tool_calls": []}]}).backend == "scripted"
    cases = [
        ({"backend": "openai", "temperature": "hot"}, "model.temperature"),
        ({"backend": "openai", "temprature": 0.1}, "model.temprature"),
        ({"backend": "openai", "endpoints": ["gpu1:8000"]}, "model.endpoints"),
        ({"backend": "openai", "top_logprobs": 99}, "model.top_logprobs"),
        ({"backend": "scripted", "replies": []}, "model.replies"),
        ({"backend": "scripted"}, "model.replies"),
        ({"backend": "nope"}, "model.backend"),
        ({"backend": "no_such_pkg.models:Backend"}, "model.backend"),
    ]
    for section, field in cases:
        with pytest.raises(SpecError) as info:
            validate_model_section(section)
        assert info.value.field == field, (section, info.value)
        assert field in str(info.value)


class EchoConfig(BackendConfig):
    """A user's backend section."""

    prefix: str = "echo: "


class EchoBackend:
    """A user's backend, given by dotted path."""

    config_model = EchoConfig

    def __init__(self, settings, redis_client=None):
        pass

    def complete(self, request: ModelRequest) -> ModelReply:
        config = EchoConfig.model_validate(request.model | {"backend": "echo"})
        return ModelReply(content=config.prefix + request.messages[-1]["content"])


def test_a_users_backend_by_dotted_path():
    path = f"{__name__}:EchoBackend"
    assert validate_model_section({"backend": path, "prefix": "> "}).prefix == "> "
    with pytest.raises(SpecError, match="model.prefx"):
        validate_model_section({"backend": path, "prefx": "> "})
    backend = load_backend(f"{__name__}.EchoBackend", None)
    assert backend.complete(ModelRequest(messages=[{"role": "user", "content": "hi"}])).content == "echo: hi"


def test_scripted_replies_can_be_tool_calls():
    call = {"id": "c1", "type": "function", "function": {"name": "bash", "arguments": "{}"}}
    backend = load_backend("scripted", None)
    reply = backend.complete(ModelRequest(messages=[], model={"replies": [{"content": None, "tool_calls": [call]}]}))
    assert reply.tool_calls == [call] and reply.finish_reason == "tool_calls" and reply.content == ""


# --- the wire format, unit by unit ----------------------------------------------------------------------
def _sse(*chunks) -> list[str]:
    return [f"data: {json.dumps(c)}" if not isinstance(c, str) else f"data: {c}" for c in chunks] + [""]


def test_a_vllm_stream_with_two_choices_is_reassembled():
    from megaflow.model_gateway.openai_wire import assemble_stream, parse_reply

    lines = _sse(
        {
            "id": "x",
            "prompt_token_ids": [1, 2, 3],
            "choices": [{"index": 0, "delta": {"role": "assistant"}}, {"index": 1, "delta": {"role": "assistant"}}],
        },
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {"content": "Hel"},
                    "token_ids": [10],
                    "logprobs": {"content": [{"token": "token_id:10", "logprob": -0.5}]},
                }
            ]
        },
        {"choices": [{"index": 1, "delta": {"reasoning": "hmm"}, "token_ids": [20]}]},
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {"content": "lo"},
                    "token_ids": [11],
                    "finish_reason": "stop",
                    "logprobs": {"content": [{"token": "token_id:11", "logprob": -0.25}]},
                }
            ]
        },
        {
            "choices": [
                {
                    "index": 1,
                    "delta": {
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "c9",
                                "type": "function",
                                "function": {"name": "bash", "arguments": '{"a"'},
                            }
                        ]
                    },
                }
            ]
        },
        {
            "choices": [
                {
                    "index": 1,
                    "delta": {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]},
                    "finish_reason": "tool_calls",
                }
            ]
        },
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}},
        "[DONE]",
    )
    fields = parse_reply(assemble_stream(lines))
    assert fields["content"] == "Hello" and fields["token_ids"] == [10, 11] and fields["prompt_token_ids"] == [1, 2, 3]
    assert fields["logprobs"] == [-0.5, -0.25] and fields["usage"]["total_tokens"] == 7
    first, second = fields["choices"]
    assert first["content"] == "Hello" and second["reasoning_content"] == "hmm"
    assert second["tool_calls"] == [
        {"id": "c9", "type": "function", "function": {"name": "bash", "arguments": '{"a": 1}'}}
    ]
    assert second["finish_reason"] == "tool_calls" and second["token_ids"] == [20]


def test_stream_errors_and_cut_streams_are_told_apart():
    from megaflow.model_gateway.openai_wire import IncompleteStream, StreamError, assemble_stream

    with pytest.raises(StreamError) as info:
        assemble_stream(_sse({"error": {"message": "bad n", "type": "BadRequestError", "code": 400}}))
    assert info.value.status == 400 and info.value.message == "bad n"
    with pytest.raises(IncompleteStream) as cut:
        assemble_stream(_sse({"choices": [{"index": 0, "delta": {"content": "par"}}]}))
    assert cut.value.events == 1
    with pytest.raises(IncompleteStream) as empty:
        assemble_stream([": keep-alive", ""])
    assert empty.value.events == 0


def test_one_spec_runs_on_either_backend():
    section = {"replies": ["ok"], "temperature": 0.0, "tools": TOOLS, "model_name": "m", "max_tokens": 64}
    assert validate_model_section({**section, "backend": "scripted"}).replies == ["ok"]
    assert validate_model_section({**section, "backend": "openai"}).max_tokens == 64
    reply = load_backend("scripted", None).complete(ModelRequest(messages=[], model=section))
    assert reply.content == "ok"
    with pytest.raises(ModelRequestError, match=r"model\.temperature"):
        load_backend("scripted", None).complete(ModelRequest(messages=[], model={**section, "temperature": "hot"}))
