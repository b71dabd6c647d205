"""The openai backend against a REAL OpenAI-compatible server: llama.cpp's, from llama-cpp-python.

The server loads a tiny llama model with random weights that :mod:`tiny_gguf` writes (no
download), with the ``chatml-function-calling`` chat format: what it says is noise, but the API
it speaks (streaming, tool calls by grammar, logprobs, its error shapes) is the real one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import IN_CI, free_port
from tiny_gguf import write_tiny_llama

from megaflow.core.errors import ContextLengthError, ModelUnavailableError
from megaflow.model_gateway import ModelRequest, load_backend
from megaflow.model_gateway.errors import ModelRequestError, cause_of

pytestmark = pytest.mark.llama

N_CTX = 1024
GREEDY = {"temperature": 0.0}  # the tiny model's greedy path never reaches </s>: every reply runs to max_tokens
BASH = {
    "type": "function",
    "function": {
        "name": "bash",
        "description": "Run one shell command.",
        "parameters": {
            "type": "object",
            "properties": {"command": {"type": "string", "enum": ["ls -la"]}},
            "required": ["command"],
        },
    },
}


class LlamaServer:
    """``python -m llama_cpp.server`` on a free loopback port, serving the tiny model as ``tiny``."""

    def __init__(self, model: Path, log: Path):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.log = log
        cmd = [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(model),
            "--model_alias",
            "tiny",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--n_ctx",
            str(N_CTX),
            "--n_threads",
            "1",
            "--chat_format",
            "chatml-function-calling",
            "--verbose",
            "False",
        ]
        self.proc = subprocess.Popen(cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama.cpp server exited ({self.proc.returncode}): {log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.base_url}/models", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"llama.cpp server did not answer within 120s: {log.read_text()[-2000:]}")

    def cpu_s(self) -> float:
        """CPU seconds the server process has used (from /proc)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError as exc:
        if IN_CI:
            pytest.fail(f"llama-cpp-python[server] is not installed ({exc}); requirements-dev.txt pins it")
        pytest.skip("llama-cpp-python[server] is not installed (`make test` installs requirements-dev.txt)")
    return write_tiny_llama(tmp_path_factory.mktemp("llama") / "tiny.gguf")


@pytest.fixture(scope="module")
def llama(tiny_model):
    server = LlamaServer(tiny_model, tiny_model.parent / "server.log")
    yield server
    server.stop()


def backend_for(settings, redis_client, endpoint, **overrides):
    fast = {
        "model_backend": "openai",
        "model_name": "tiny",
        "model_endpoints": [endpoint],
        "model_backoff_base_s": 0.05,
        "model_backoff_max_s": 0.2,
        "model_timeout_s": 30.0,
        "model_max_retries": 3,
        "model_retry_budget_s": 60.0,
        "model_unhealthy_after": 10,
    }
    fast.update(overrides)
    return load_backend("openai", settings.model_copy(update=fast), redis_client)


def ask(backend, text="Say hello.", *, session="ep-1", **model):
    model.setdefault("max_tokens", 8)
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": text}]
    return backend.complete(ModelRequest(messages=messages, model=model, session_id=session, step=0, batch_id="b"))


@pytest.mark.parametrize("stream", [False, True])
def test_plain_chat(settings, redis_client, llama, stream):
    reply = ask(backend_for(settings, redis_client, llama.base_url), stream=stream, **GREEDY)
    assert reply.streamed is stream and reply.endpoint == llama.base_url and reply.attempts == 1
    assert reply.finish_reason == "length" and reply.content
    assert reply.completion_tokens > 0  # streamed: llama.cpp sends no usage chunk, so one per delta
    if not stream:
        assert reply.prompt_tokens > 10
        assert reply.usage["total_tokens"] == reply.prompt_tokens + reply.completion_tokens
    assert reply.message["role"] == "assistant"


@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls(settings, redis_client, llama, stream):
    backend = backend_for(settings, redis_client, llama.base_url)
    reply = ask(
        backend,
        "List the files.",
        stream=stream,
        max_tokens=64,
        tools=[BASH],
        tool_choice={"type": "function", "function": {"name": "bash"}},
    )
    assert reply.finish_reason == "tool_calls", reply
    [call] = reply.tool_calls
    assert call["type"] == "function" and call["id"] and call["function"]["name"] == "bash"
    assert json.loads(call["function"]["arguments"]) == {"command": "ls -la"}
    # the call and its result go back to the server as a conversation it accepts
    record = reply.history_record(step=1)
    from megaflow.model_gateway import chat_message

    messages = [
        {"role": "user", "content": "List the files."},
        chat_message(record),
        {"role": "tool", "tool_call_id": call["id"], "name": "bash", "content": "a.txt b.txt"},
    ]
    follow = backend.complete(
        ModelRequest(messages=messages, model={"max_tokens": 4, "tools": [BASH], **GREEDY}, session_id="ep-1")
    )
    assert follow.endpoint == llama.base_url


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs(settings, redis_client, llama, stream):
    reply = ask(backend_for(settings, redis_client, llama.base_url), stream=stream, logprobs=True, **GREEDY)
    assert reply.logprobs is not None and len(reply.logprobs) == 8  # `logprobs: true` alone records them
    assert all(lp <= 0 for lp in reply.logprobs)
    assert all("token" in c and "top_logprobs" in c for c in reply.logprobs_content)


@pytest.mark.parametrize("stream", [False, True])
def test_context_overflow(settings, redis_client, llama, stream):
    backend = backend_for(settings, redis_client, llama.base_url)
    with pytest.raises(ContextLengthError, match="maximum context length") as info:
        ask(backend, "x" * (N_CTX + 200), stream=stream)
    assert cause_of(info.value) == "context_length"
    assert all(row["healthy"] and row["failures"] == 0 for row in backend.pool("tiny", [llama.base_url]).status())


def test_bad_parameter_is_a_request_error_without_retries(settings, redis_client, llama):
    backend = backend_for(settings, redis_client, llama.base_url, model_unhealthy_after=1)
    with pytest.raises(ModelRequestError, match="temperature") as info:  # llama.cpp answers 500 for it
        ask(backend, stream=False, extra_body={"temperature": "hot"})
    assert cause_of(info.value) == "model_request" and info.value.status in (400, 422, 500)
    assert all(row["healthy"] for row in backend.pool("tiny", [llama.base_url]).status())
    assert ask(backend, **GREEDY).attempts == 1  # the endpoint is still in use


def test_server_killed_mid_request(settings, redis_client, tiny_model):
    server = LlamaServer(tiny_model, tiny_model.parent / "killed.log")
    try:
        backend = backend_for(settings, redis_client, server.base_url, model_max_retries=2)
        before = server.cpu_s()
        outcome: dict[str, BaseException] = {}

        def call() -> None:
            try:
                ask(backend, max_tokens=900, **GREEDY)  # a long generation
            except BaseException as exc:  # noqa: BLE001 - checked below
                outcome["error"] = exc

        worker = threading.Thread(target=call)
        worker.start()
        deadline = time.monotonic() + 60
        while server.cpu_s() - before < 0.3 and time.monotonic() < deadline:  # generating (about 6 s in all)
            time.sleep(0.02)
        assert worker.is_alive(), "the generation ended before the server could be killed"
        server.proc.kill()
        worker.join(60)
        error = outcome.get("error")
        assert isinstance(error, ModelUnavailableError), error
        assert cause_of(error) == "infra" and "retry budget spent (3 attempt(s)" in str(error)
        assert server.base_url in str(error)
    finally:
        server.stop()
