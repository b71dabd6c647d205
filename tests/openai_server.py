"""A real OpenAI-compatible chat-completions server on loopback, for tests and the benchmark.

Implements ``POST /v1/chat/completions`` and ``GET /v1/models`` over HTTP/1.1 (keep-alive) with
the stdlib ``ThreadingHTTPServer``. Controls, per server:

- ``delay_s``: every completion answers after this fixed delay;
- ``max_concurrency``: completions processed at once (like vLLM's ``--max-num-seqs``); the rest
  wait their turn, so the server's own limit is ``max_concurrency / delay_s`` requests a second;
- ``inject(kind, n)``: the next ``n`` completions fail as ``kind``: ``"429"``, ``"500"``,
  ``"503"``, ``"400"``, ``"401"``, ``"403"``, ``"404"``, ``"422"``, ``"context"`` (vLLM's
  context-length 400), ``"500_validation"`` (llama-cpp-python's 500 for a bad parameter),
  ``"slow"`` (sleeps ``slow_s`` first, to trip the client's time-out),
  ``"drop"`` (closes the connection), ``"cut"`` (a stream that stops half-way) or
  ``"stream_error"`` (a stream whose first event is an error);
- ``stream: true`` requests are answered as server-sent events (chunked), deltas of the same reply,
  with the usage chunk when ``stream_options.include_usage`` is set; ``chunk_delay_s`` between events;
- ``tool_call``: when set (``{"name": ..., "arguments": "{...}"}``), the reply is that tool call
  (content null, ``finish_reason: tool_calls``); ``reasoning``: reasoning_content sent beside the text;
- ``logprobs``: answered when the request asks for them (``logprobs: true``), with vLLM's
  ``return_tokens_as_token_ids`` and ``return_token_ids`` extensions;
- ``down``: every request, ``/v1/models`` included, gets a 503 (an unhealthy endpoint).

Every reply names the server that answered (``system_fingerprint`` and the ``X-Server-Name``
header) and ``requests`` keeps what each one received, for balancing and stickiness tests.
The same controls are reachable over HTTP (``POST /control``) when the server runs in another
process: ``python -m tests.openai_server --port 0 --delay 0.1`` prints ``PORT <n>``.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import zlib
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

CONTEXT_MESSAGE = (
    "This model's maximum context length is 4096 tokens. However, you requested 5000 tokens "
    "(4900 in the messages, 100 in the completion). Please reduce the length of the messages or completion."
)


def _token_id(word: str) -> int:
    return zlib.crc32(word.encode()) % 50000


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def _send(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Server-Name", self.server.owner.name)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _read_json(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b"{}"
        try:
            return json.loads(raw or b"{}")
        except ValueError:
            return {}

    def do_GET(self) -> None:
        owner = self.server.owner
        if self.path.rstrip("/") != "/v1/models":
            return self._send(404, {"error": {"message": "not found", "type": "NotFoundError", "code": 404}})
        with owner.lock:
            owner.probes += 1
        if owner.down:
            return self._send(503, {"error": {"message": "server down", "code": 503}})
        self._send(200, {"object": "list", "data": [{"id": owner.model, "object": "model", "owned_by": "tests"}]})

    def do_POST(self) -> None:
        owner = self.server.owner
        body = self._read_json()
        path = self.path.rstrip("/")
        if path == "/control":
            owner.control(body)
            return self._send(200, owner.stats())
        if path != "/v1/chat/completions":
            return self._send(404, {"error": {"message": "not found", "code": 404}})
        record = {"body": body, "headers": {k.lower(): v for k, v in self.headers.items()}}
        with owner.lock:
            owner.requests.append(record)
            owner.received += 1
            fault = owner.faults.popleft() if owner.faults else None
        if owner.down:
            return self._send(503, {"error": {"message": "server down", "code": 503}})
        if fault == "drop":
            self.close_connection = True
            self.connection.close()
            return
        if fault == "slow":
            time.sleep(owner.slow_s)
        elif fault in ("429", "500", "503", "400", "401", "403", "404", "422", "context", "500_validation"):
            return self._send(*_fault_reply(fault))
        with owner.slots:
            with owner.lock:
                owner.active += 1
                owner.peak = max(owner.peak, owner.active)
            try:
                if owner.delay_s:
                    time.sleep(owner.delay_s)
                reply = owner.completion(body)
            finally:
                with owner.lock:
                    owner.active -= 1
                    owner.answered += 1
        version = owner.policy_version or self.headers.get("X-Policy-Version")
        headers = {"X-Policy-Version": version} if version else None
        if body.get("stream") or fault in ("cut", "stream_error"):
            return self._stream(reply, body, headers, fault)
        self._send(200, reply, headers)

    def _stream(
        self, reply: dict[str, Any], body: dict[str, Any], headers: dict[str, str] | None, fault: str | None
    ) -> None:
        """Answer as server-sent events, in HTTP/1.1 chunks."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("X-Server-Name", self.server.owner.name)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()

        def event(data: str) -> None:
            raw = f"data: {data}\n\n".encode()
            self.wfile.write(f"{len(raw):x}\r\n".encode() + raw + b"\r\n")
            self.wfile.flush()

        try:
            self._events(event, reply, body, fault)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (its time-out): nothing to answer
            self.close_connection = True

    def _events(self, event: Any, reply: dict[str, Any], body: dict[str, Any], fault: str | None) -> None:
        if fault == "stream_error":
            event(
                json.dumps(
                    {"error": {"message": "invalid request: n must be 1", "type": "BadRequestError", "code": 400}}
                )
            )
        else:
            chunks = _chunks(reply, bool((body.get("stream_options") or {}).get("include_usage")))
            for i, chunk in enumerate(chunks):
                if fault == "cut" and i == len(chunks) // 2:
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                event(json.dumps(chunk))
                if self.server.owner.chunk_delay_s:
                    time.sleep(self.server.owner.chunk_delay_s)
            event("[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def _chunks(reply: dict[str, Any], include_usage: bool) -> list[dict[str, Any]]:
    """The SSE chunks of a plain reply: role first, content word by word, tool calls in two parts."""
    base = {k: reply[k] for k in ("id", "created", "model", "system_fingerprint")}
    base["object"] = "chat.completion.chunk"
    choice = reply["choices"][0]
    message = choice["message"]
    content = (choice.get("logprobs") or {}).get("content") or []
    token_ids = choice.get("token_ids") or []
    first: dict[str, Any] = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
    out = [{**base, "choices": [first]}]
    if "prompt_token_ids" in reply:
        out[0]["prompt_token_ids"] = reply["prompt_token_ids"]
    if message.get("reasoning_content"):
        for part in message["reasoning_content"].split(" "):
            out.append(
                {**base, "choices": [{"index": 0, "delta": {"reasoning_content": part + " "}, "finish_reason": None}]}
            )
    words = (message.get("content") or "").split(" ") if message.get("content") else []
    for i, word in enumerate(words):
        delta = {"content": word if i == 0 else " " + word}
        ch: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": None}
        if i < len(content):
            ch["logprobs"] = {"content": [content[i]]}
        if i < len(token_ids):
            ch["token_ids"] = [token_ids[i]]
        out.append({**base, "choices": [ch]})
    for idx, call in enumerate(message.get("tool_calls") or []):
        args = call["function"]["arguments"]
        half = len(args) // 2
        out.append(
            {
                **base,
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": None,
                        "delta": {
                            "tool_calls": [
                                {
                                    "index": idx,
                                    "id": call["id"],
                                    "type": "function",
                                    "function": {"name": call["function"]["name"], "arguments": args[:half]},
                                }
                            ]
                        },
                    }
                ],
            }
        )
        out.append(
            {
                **base,
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": None,
                        "delta": {"tool_calls": [{"index": idx, "function": {"arguments": args[half:]}}]},
                    }
                ],
            }
        )
    out.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}]})
    if include_usage:
        out.append({**base, "choices": [], "usage": reply["usage"]})
    return out


def _fault_reply(kind: str) -> tuple[int, dict[str, Any], dict[str, str] | None]:
    if kind == "429":
        return 429, {"error": {"message": "rate limited", "type": "RateLimitError", "code": 429}}, {"Retry-After": "0"}
    if kind in ("500", "503"):
        return (
            int(kind),
            {"error": {"message": "internal error", "type": "InternalServerError", "code": int(kind)}},
            None,
        )
    if kind in ("401", "403"):
        return (
            int(kind),
            {
                "error": {
                    "message": "Incorrect API key provided",
                    "type": "invalid_request_error",
                    "code": "invalid_api_key",
                }
            },
            None,
        )
    if kind == "500_validation":  # llama-cpp-python's server: a bad parameter comes back as a 500
        message = (
            "1 validation error:\n  {'type': 'float_parsing', 'loc': ('body', 'temperature'), "
            "'msg': 'Input should be a valid number'}"
        )
        return 500, {"error": {"message": message, "type": "internal_server_error", "param": None, "code": None}}, None
    if kind == "404":
        return (
            404,
            {"error": {"message": "The model `nope` does not exist.", "type": "NotFoundError", "code": 404}},
            None,
        )
    if kind == "422":  # FastAPI's validation shape (llama.cpp's server, SGLang)
        return (
            422,
            {
                "detail": [
                    {"loc": ["body", "temperature"], "msg": "Input should be a valid number", "type": "float_parsing"}
                ]
            },
            None,
        )
    if kind == "context":  # vLLM's shape: {"error": {...}} with code 400
        return 400, {"error": {"message": CONTEXT_MESSAGE, "type": "BadRequestError", "param": None, "code": 400}}, None
    return (
        400,
        {"error": {"message": "invalid request: temperature must be >= 0", "type": "BadRequestError", "code": 400}},
        None,
    )


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 2048  # the listen backlog: 1,000 clients connect at once in the benchmark
    owner: OpenAIServer


class OpenAIServer:
    """One loopback server; a context manager (``with OpenAIServer(name="a") as s: s.base_url``)."""

    def __init__(
        self,
        name: str = "srv",
        *,
        model: str = "test-model",
        delay_s: float = 0.0,
        max_concurrency: int = 1024,
        slow_s: float = 2.0,
        host: str = "127.0.0.1",
        port: int = 0,
    ):
        self.name = name
        self.model = model
        self.delay_s = delay_s
        self.slow_s = slow_s
        self.down = False
        self.policy_version: str | None = None
        self.reply_text: str | None = None
        self.tool_call: dict[str, str] | None = None
        self.reasoning: str | None = None
        self.chunk_delay_s = 0.0
        self.max_concurrency = max_concurrency
        self.slots = threading.BoundedSemaphore(max_concurrency)
        self.lock = threading.Lock()
        self.faults: deque[str] = deque()
        self.requests: list[dict[str, Any]] = []
        self.received = self.answered = self.active = self.peak = self.probes = 0
        self._httpd = _Server((host, port), _Handler)
        self._httpd.owner = self
        self._thread: threading.Thread | None = None

    # --- life cycle -----------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> OpenAIServer:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"openai-server-{self.name}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- controls -------------------------------------------------------------------------------
    def inject(self, kind: str, n: int = 1) -> None:
        """Make the next ``n`` completions fail as ``kind`` (see the module docstring)."""
        with self.lock:
            self.faults.extend([kind] * n)

    def control(self, body: dict[str, Any]) -> None:
        """Apply ``{"inject": [kind, n], "delay_s": x, "down": bool, "reset": true}`` (the HTTP form)."""
        if body.get("reset"):
            with self.lock:
                self.faults.clear()
                self.requests.clear()
                self.received = self.answered = self.peak = self.probes = 0
        if "inject" in body:
            kind, n = body["inject"]
            self.inject(str(kind), int(n))
        for name in ("delay_s", "slow_s", "chunk_delay_s"):
            if name in body:
                setattr(self, name, float(body[name]))
        if "down" in body:
            self.down = bool(body["down"])

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {
                "name": self.name,
                "received": self.received,
                "answered": self.answered,
                "active": self.active,
                "peak": self.peak,
                "probes": self.probes,
                "max_concurrency": self.max_concurrency,
                "delay_s": self.delay_s,
            }

    def sessions(self) -> set[str]:
        """Session ids (``metadata.session_id``) this server answered for."""
        with self.lock:
            return {str((r["body"].get("metadata") or {}).get("session_id")) for r in self.requests}

    # --- the reply --------------------------------------------------------------------------------
    def completion(self, body: dict[str, Any]) -> dict[str, Any]:
        messages = body.get("messages") or []
        last = next((str(m.get("content") or "") for m in reversed(messages) if m.get("role") == "user"), "")
        text = self.reply_text if self.reply_text is not None else f"{self.name} says: {last}"
        words = text.split()
        max_tokens = body.get("max_tokens")
        if isinstance(max_tokens, int) and max_tokens < len(words):
            words, finish = words[:max_tokens], "length"
            text = " ".join(words)
        else:
            finish = "stop"
        prompt_tokens = sum(len(str(m.get("content") or "").split()) for m in messages)
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if self.tool_call is not None:
            message = {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": f"call_{len(messages)}", "type": "function", "function": dict(self.tool_call)}],
            }
            finish = "tool_calls"
        if self.reasoning:
            message["reasoning_content"] = self.reasoning
        choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
        reply: dict[str, Any] = {
            "id": f"chatcmpl-{self.name}-{time.monotonic_ns()}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", self.model),
            "system_fingerprint": self.name,
            "choices": [choice],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(words),
                "total_tokens": prompt_tokens + len(words),
            },
        }
        as_ids = bool(body.get("return_tokens_as_token_ids"))
        if body.get("logprobs"):
            choice["logprobs"] = {
                "content": [
                    {
                        "token": f"token_id:{_token_id(w)}" if as_ids else w,
                        "logprob": round(-0.05 * (i + 1), 4),
                        "bytes": list(w.encode()),
                        "top_logprobs": [],
                    }
                    for i, w in enumerate(words)
                ]
            }
        if body.get("return_token_ids"):
            choice["token_ids"] = [_token_id(w) for w in words]
            reply["prompt_token_ids"] = [_token_id(w) for m in messages for w in str(m.get("content") or "").split()]
        return reply


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--name", default="srv")
    parser.add_argument("--model", default="test-model")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--max-concurrency", type=int, default=1024)
    args, _ = parser.parse_known_args()  # tolerate vllm-style flags when it stands in for `vllm serve`
    server = OpenAIServer(
        args.name,
        model=args.model,
        delay_s=args.delay,
        max_concurrency=args.max_concurrency,
        host=args.host,
        port=args.port,
    )
    print(f"PORT {server.port}", flush=True)
    try:
        server._httpd.serve_forever(poll_interval=0.05)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
