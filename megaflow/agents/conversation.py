"""The model request an episode's history makes: chat messages plus the agent's request options.

The model service calls ``build_request(history, agent_request)`` for every call. History records
hold chat messages (roles system/user/assistant/tool) and notes the model never sees (role ``env``:
a command's raw result; role ``exit``: how the agent ended; ``evaluation``). A record with
``drop_reply: true`` takes the assistant reply just before it out of the conversation (a
malformed reply, as mini-swe-agent does). ``agent_request`` is the JSON object an agent saved in
the episode's ``agent_request`` field (``tools``, ``tool_choice``, sampling keys, and
``cache_control: "default_end"`` for mini-swe-agent's explicit cache-control markers).
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from typing import Any

CHAT_ROLES = ("system", "user", "assistant", "tool")
MESSAGE_KEYS = ("role", "content", "name", "tool_calls", "tool_call_id")
LOCAL_OPTIONS = ("cache_control",)  # request options applied here, never sent as such


class _Memo:
    """The conversation made from a history's first ``n`` records (``first`` and ``last`` of them kept
    to recognise that prefix: records are never changed, a re-read history has new objects)."""

    __slots__ = ("first", "last", "messages", "n")

    def __init__(self, first: dict, last: dict, n: int, messages: list[dict[str, Any]]):
        self.first, self.last, self.n, self.messages = first, last, n, messages


_MEMO: OrderedDict[int, _Memo] = OrderedDict()  # id(first record) -> memo, most recent last
_MEMO_MAX = 1024
_MEMO_LOCK = threading.Lock()


def chat_messages(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation the model sees: chat records in order, OpenAI message keys only.

    A history only grows, and the engine's history cache hands out the same record objects for the
    prefix it already holds, so the messages of that prefix are reused: a step converts only the
    records added since the episode's last model call in this process (its cost does not grow with
    the episode's length). The returned messages are shared: callers copy before changing them.
    """
    if not history:
        return []
    key = id(history[0])
    with _MEMO_LOCK:
        memo = _MEMO.get(key)
    if memo is not None and memo.first is history[0] and memo.n <= len(history) and history[memo.n - 1] is memo.last:
        out, start = list(memo.messages), memo.n
    else:
        out, start = [], 0
    for rec in history[start:]:
        if rec.get("drop_reply") and out and out[-1].get("role") == "assistant":
            out.pop()
        if rec.get("role") not in CHAT_ROLES or rec.get("chat") is False:
            continue
        msg = {k: rec[k] for k in MESSAGE_KEYS if k in rec and (rec[k] is not None or k == "content")}
        if msg.get("role") == "assistant" and not msg.get("tool_calls"):
            msg.pop("tool_calls", None)
        out.append(msg)
    with _MEMO_LOCK:
        _MEMO.pop(key, None)
        _MEMO[key] = _Memo(history[0], history[-1], len(history), list(out))
        while len(_MEMO) > _MEMO_MAX:
            _MEMO.popitem(last=False)
    return out


def set_cache_control(messages: list[dict[str, Any]], mode: str | None) -> list[dict[str, Any]]:
    """mini-swe-agent's ``default_end`` markers: the last message carries an ephemeral cache mark."""
    if not mode or not messages:
        return messages
    if mode != "default_end":
        raise ValueError(f"cache_control: unknown mode {mode!r} (only 'default_end')")
    messages = copy.deepcopy(messages)
    last = messages[-1]
    mark = {"type": "ephemeral"}
    if last.get("content") is None:
        last["cache_control"] = mark
    elif isinstance(last["content"], str):
        last["content"] = [{"type": "text", "text": last["content"], "cache_control": mark}]
    else:
        last["content"][0]["cache_control"] = mark
    if last.get("role") == "tool" and isinstance(last.get("content"), list):
        last["content"][0].pop("cache_control", None)
        last["cache_control"] = mark
    return messages


def build_request(history: list[dict[str, Any]], agent_request: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{"messages": [...], **options}``: what the model service sends (the spec's model section on top)."""
    options = dict(agent_request or {})
    messages = set_cache_control(chat_messages(history), options.get("cache_control"))
    return {"messages": messages, **{k: v for k, v in options.items() if k not in LOCAL_OPTIONS}}
