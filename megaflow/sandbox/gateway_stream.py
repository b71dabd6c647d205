"""A whole chat completion re-sent as an OpenAI-compatible server-sent-event stream (``stream: true``).

The episode gateway makes one model-service call per request and gets the whole reply; an agent that
asked for a stream gets that reply as ``chat.completion.chunk`` events, in the order OpenAI sends them:
per choice a first delta with the role, then reasoning, content (with its logprobs) and tool-call
deltas (name and id first, then the arguments), then a chunk with the finish reason; with
``stream_options.include_usage`` every chunk carries ``"usage": null`` and one last chunk with no
choices carries the usage; then ``data: [DONE]``. The official ``openai`` client, litellm and the
SDK's ``chat.completions.stream`` helper reassemble exactly the non-streamed message from it.
"""

from __future__ import annotations

import json
from typing import Any

DONE = b"data: [DONE]\n\n"


def _choice_chunks(choice: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``choices`` entries (one per chunk) that stream one whole choice."""
    index = int(choice.get("index") or 0)
    message = choice.get("message") or {}
    first = {"role": message.get("role") or "assistant", "content": None if message.get("content") is None else ""}
    out: list[dict[str, Any]] = [{"index": index, "delta": first, "finish_reason": None}]
    reasoning = message.get("reasoning_content")
    if reasoning:
        out.append({"index": index, "delta": {"reasoning_content": reasoning}, "finish_reason": None})
    content = message.get("content")
    if content:
        piece: dict[str, Any] = {"index": index, "delta": {"content": content}, "finish_reason": None}
        if choice.get("logprobs"):
            piece["logprobs"] = choice["logprobs"]
        out.append(piece)
    for i, call in enumerate(message.get("tool_calls") or []):
        fn = call.get("function") or {}
        head = {"index": i, "id": call.get("id"), "type": call.get("type") or "function"}
        head["function"] = {"name": fn.get("name"), "arguments": ""}
        out.append({"index": index, "delta": {"tool_calls": [head]}, "finish_reason": None})
        if fn.get("arguments"):
            args = {"index": i, "function": {"arguments": fn["arguments"]}}
            out.append({"index": index, "delta": {"tool_calls": [args]}, "finish_reason": None})
    out.append({"index": index, "delta": {}, "finish_reason": choice.get("finish_reason") or "stop"})
    return out


def completion_chunks(body: dict[str, Any], include_usage: bool = False) -> list[dict[str, Any]]:
    """The ``chat.completion.chunk`` objects of a whole ``chat.completion`` body, in sending order."""
    head = {"id": body["id"], "object": "chat.completion.chunk", "created": body["created"], "model": body["model"]}
    chunks = []
    for choice in body.get("choices") or []:
        for piece in _choice_chunks(choice):
            chunk = {**head, "choices": [piece]}
            if include_usage:
                chunk["usage"] = None
            chunks.append(chunk)
    if include_usage:
        chunks.append({**head, "choices": [], "usage": body.get("usage")})
    return chunks


def sse_payload(body: dict[str, Any], include_usage: bool = False) -> bytes:
    """The whole event stream for a ``chat.completion`` body: one ``data:`` event per chunk, then ``[DONE]``."""
    events = [b"data: " + json.dumps(c).encode() + b"\n\n" for c in completion_chunks(body, include_usage)]
    return b"".join(events) + DONE
