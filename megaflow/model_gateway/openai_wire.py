"""The wire format of OpenAI-compatible chat completions: replies (plain or streamed) and errors.

A streamed reply (server-sent events, ``stream_options.include_usage``) is reassembled into the
shape of a plain one: content, reasoning and refusal text concatenated, ``tool_calls`` deltas
merged by index (arguments concatenated), logprobs and vLLM token ids collected, the final
usage chunk kept. :func:`parse_reply` then reads either into the fields of a ModelReply.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

CONTEXT_MARKERS = (
    "context length",
    "context_length",
    "maximum context",
    "context window",
    "too many tokens",
    "prompt is too long",
    "exceed_context_size",
    "exceeds the context",
)
VALIDATION_MARKERS = ("validation error", "'loc': ('body'", "unprocessable entity")
REQUEST_ERROR_TYPES = (
    "invalid_request_error",
    "badrequesterror",
    "invalidrequesterror",
    "unprocessableentityerror",
    "notfounderror",
)


class StreamError(Exception):
    """The server reported an error inside the event stream (``data: {"error": ...}``)."""

    def __init__(self, status: int, message: str, code: str = ""):
        self.status, self.message, self.code = status, message, code
        super().__init__(f"{status}: {message}")


class IncompleteStream(Exception):
    """The event stream ended before the reply was complete (no finish reason, no ``[DONE]``).

    ``events`` counts the data events received: none at all means the server failed before its
    first chunk (llama-cpp-python's server answers a context overflow so), worth asking unstreamed.
    """

    def __init__(self, message: str, events: int):
        self.events = events
        super().__init__(message)


def error_message(body: Any, text: str = "") -> tuple[str, str]:
    """(message, code or type) from an OpenAI-style ({"error": {...}}) or vLLM-style ({"message": ...}) body."""
    if not isinstance(body, dict):
        return (text or str(body))[:2000], ""
    err = body.get("error", body)
    if isinstance(err, str):
        return err[:2000], str(body.get("code") or body.get("type") or "")
    if not isinstance(err, dict):
        return str(body)[:2000], ""
    message = err.get("message") or err.get("detail") or body.get("detail") or ""
    if not isinstance(message, str):
        message = json.dumps(message)  # FastAPI 422: a list of {loc, msg}
    return message[:2000], str(err.get("code") or err.get("type") or "")


def is_context_overflow(message: str, code: str) -> bool:
    low = f"{message} {code}".lower()
    return any(m in low for m in CONTEXT_MARKERS)


def is_request_error(message: str, code: str) -> bool:
    """A 5xx whose body says the request itself was bad (llama-cpp-python's server answers 500 with
    pydantic's "validation error ... 'loc': ('body', ...)" for a bad parameter)."""
    if code.replace("_", "").lower() in {t.replace("_", "") for t in REQUEST_ERROR_TYPES}:
        return True
    low = message.lower()
    return any(m in low for m in VALIDATION_MARKERS)


def _merge(acc: dict[str, Any], delta: dict[str, Any]) -> None:
    """Merge one delta into an accumulated message: strings concatenate, tool calls merge by index."""
    for key, value in delta.items():
        if value is None:
            continue
        if key == "tool_calls":
            calls = acc.setdefault("tool_calls", [])
            for part in value:
                idx = part.get("index", len(calls))
                while len(calls) <= idx:
                    calls.append({"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
                call = calls[idx]
                for k in ("id", "type"):
                    if part.get(k):
                        call[k] = part[k]
                fn = part.get("function") or {}
                if fn.get("name"):
                    call["function"]["name"] = call["function"]["name"] or fn["name"]
                if fn.get("arguments"):
                    call["function"]["arguments"] += fn["arguments"]
        elif key == "function_call":
            fc = acc.setdefault("function_call", {"name": "", "arguments": ""})
            fc["name"] = fc["name"] or value.get("name") or ""
            fc["arguments"] += value.get("arguments") or ""
        elif isinstance(value, str) and key != "role":
            acc[key] = (acc.get(key) or "") + value
        else:
            acc[key] = value


def assemble_stream(lines: Iterable[str]) -> dict[str, Any]:
    """A plain chat-completion body from the lines of an SSE stream (raises StreamError, IncompleteStream)."""
    out: dict[str, Any] = {}
    choices: dict[int, dict[str, Any]] = {}
    done = False
    events = 0  # data events
    pieces = 0  # deltas that carried text or a tool call: the completion's length when no usage comes
    for line in lines:
        if not line.startswith("data:"):
            continue  # comments (": ping"), event names, blank separators
        payload = line[5:].strip()
        if payload == "[DONE]":
            done = True
            break
        try:
            chunk = json.loads(payload)
        except ValueError:
            continue
        if not isinstance(chunk, dict):
            continue
        events += 1
        if chunk.get("error") is not None:
            message, code = error_message(chunk)
            err = chunk["error"] if isinstance(chunk["error"], dict) else {}
            status = err["code"] if isinstance(err.get("code"), int) else 500
            raise StreamError(status, message, code)
        for key in ("id", "model", "created", "system_fingerprint", "prompt_token_ids"):
            if chunk.get(key) is not None:
                out.setdefault(key, chunk[key])
        if chunk.get("usage"):
            out["usage"] = chunk["usage"]
        for ch in chunk.get("choices") or []:
            acc = choices.setdefault(int(ch.get("index", 0)), {"message": {"role": "assistant"}, "finish_reason": None})
            delta = ch.get("delta") or {}
            _merge(acc["message"], delta)
            if any(delta.get(k) for k in ("content", "tool_calls", "reasoning_content", "reasoning", "function_call")):
                pieces += 1
            if ch.get("finish_reason"):
                acc["finish_reason"] = ch["finish_reason"]
            if ch.get("stop_reason") is not None:
                acc["stop_reason"] = ch["stop_reason"]
            content = (ch.get("logprobs") or {}).get("content")
            if content:
                acc.setdefault("logprobs", {"content": []})["content"].extend(content)
            ids = ch.get("token_ids") or (ch.get("delta") or {}).get("token_ids")
            if ids:
                acc.setdefault("token_ids", []).extend(ids)
    if not choices or not (done or all(c["finish_reason"] for c in choices.values())):
        raise IncompleteStream(f"the event stream ended before the reply was complete ({events} events)", events)
    for acc in choices.values():
        acc["message"].pop("token_ids", None)
        acc["message"].setdefault("content", None)
    out["choices"] = [{"index": i, **choices[i]} for i in sorted(choices)]
    if "usage" not in out:  # a server that ignores stream_options.include_usage: count the deltas
        out["usage_estimated"] = {"completion_tokens": pieces}
    return out


def _choice_fields(choice: dict[str, Any]) -> dict[str, Any]:
    message = dict(choice.get("message") or {})
    message.setdefault("role", "assistant")
    out: dict[str, Any] = {
        "content": message.get("content") or "",
        "finish_reason": choice.get("finish_reason") or "stop",
        "message": message,
        "tool_calls": message.get("tool_calls") or None,
        "reasoning_content": message.get("reasoning_content") or message.get("reasoning") or None,
    }
    content = (choice.get("logprobs") or {}).get("content")
    if content:
        out["logprobs"] = [float(c.get("logprob", 0.0)) for c in content]
        out["logprobs_content"] = content
        tokens = [str(c.get("token", "")) for c in content]
        if all(t.startswith("token_id:") for t in tokens):  # vLLM --return-tokens-as-token-ids
            out["token_ids"] = [int(t[len("token_id:") :]) for t in tokens]
    if isinstance(choice.get("token_ids"), list):  # vLLM return_token_ids
        out["token_ids"] = [int(t) for t in choice["token_ids"]]
    return out


def parse_reply(data: dict[str, Any]) -> dict[str, Any]:
    """The ModelReply fields of one chat-completion body: the whole message, usage, logprobs, token ids."""
    choices = data["choices"]
    out = _choice_fields(choices[0])
    usage = data.get("usage") or {}
    out["usage"] = usage or None
    out["prompt_tokens"] = int(usage.get("prompt_tokens") or 0)
    out["completion_tokens"] = int(usage.get("completion_tokens") or 0)
    if not usage and data.get("usage_estimated"):  # streamed without a usage chunk: one token per delta
        out["completion_tokens"] = int(data["usage_estimated"]["completion_tokens"])
    if isinstance(data.get("prompt_token_ids"), list):
        out["prompt_token_ids"] = [int(t) for t in data["prompt_token_ids"]]
    elif isinstance(choices[0].get("prompt_token_ids"), list):
        out["prompt_token_ids"] = [int(t) for t in choices[0]["prompt_token_ids"]]
    if len(choices) > 1:
        out["choices"] = [{"index": c.get("index", i), **_choice_fields(c)} for i, c in enumerate(choices)]
    return out
