"""The per-step view of an episode's history: what the trajectory artifact lists under ``steps``.

Each step is one model call with its accounting (latency, tokens, token ids/logprobs when the
server gave them) and what came of it: the action (exec, submit, format_error) and its observation
(exit code, duration, output).
"""

from __future__ import annotations

import itertools
from typing import Any

MODEL_FIELDS = (
    "prompt_tokens",
    "completion_tokens",
    "latency_s",
    "finish_reason",
    "endpoint",
    "model_name",
    "policy_version",
    "attempts",
    "token_ids",
    "logprobs",
    "prompt_token_ids",
    "tool_calls",
    "reasoning_content",
    "usage",
    "logprobs_content",
    "streamed",
)


def trajectory_steps(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per model call, in order, pairing the reply with its actions and observations.

    Reads the records agents and services write: ``env``/``exec`` (a command's raw result),
    ``observation`` and ``format_error`` messages, and an ``exit`` record (mini-swe-agent's end).
    """
    steps: list[dict[str, Any]] = []
    for rec in history:
        role, kind = rec.get("role"), rec.get("kind")
        if role == "assistant":
            steps.append(
                {
                    "index": len(steps) + 1,
                    "t": rec.get("t"),
                    "reply": rec.get("content", ""),
                    "model": {k: rec[k] for k in MODEL_FIELDS if rec.get(k) is not None},
                    "action": None,
                    "observation": None,
                }
            )
            if rec.get("tool_calls"):
                steps[-1]["tool_calls"] = rec["tool_calls"]
        elif not steps:
            continue
        elif role == "env" and kind == "exec":
            step = steps[-1]
            step.setdefault("commands", []).append(rec.get("command", ""))
            step["action"] = {"type": "exec", "command": rec.get("command", "")}
            step["observation"] = {
                "exit_code": rec.get("exit_code"),
                "timed_out": rec.get("timed_out"),
                "duration_s": rec.get("duration_s"),
                "message": "",
                "t": rec.get("t"),
            }
        elif kind == "observation":
            obs = steps[-1]["observation"] or {}
            obs["message"] = "\n".join(filter(None, [obs.get("message"), _text(rec.get("content"))]))
            steps[-1]["observation"] = obs
        elif kind == "format_error":
            steps[-1]["action"] = {"type": "format_error"}
            steps[-1]["observation"] = {"message": _text(rec.get("content")), "t": rec.get("t")}
        elif role == "exit":
            status = (rec.get("extra") or {}).get("exit_status", "")
            steps[-1]["exit"] = {"status": status, "submission": (rec.get("extra") or {}).get("submission", "")}
            if status == "Submitted":
                steps[-1]["action"] = {"type": "submit"}
        elif role == "evaluation" and steps[-1]["action"] is None:
            steps[-1]["action"] = {"type": "submit"}
    for cur, nxt in itertools.pairwise(steps):
        if cur.get("t") is not None and nxt.get("t") is not None:
            cur["wall_s"] = round(float(nxt["t"]) - float(cur["t"]), 4)
    return steps


def _text(content: Any) -> str:
    """A message's text (content may be a list of parts)."""
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return str(content or "")


def token_data(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Token accounting of an episode for trainers: totals and one entry per model call."""
    turns = [
        {k: rec[k] for k in MODEL_FIELDS if rec.get(k) is not None and k not in ("endpoint", "model_name")}
        for rec in history
        if rec.get("role") == "assistant"
    ]
    return {
        "prompt_tokens": sum(int(t.get("prompt_tokens") or 0) for t in turns),
        "completion_tokens": sum(int(t.get("completion_tokens") or 0) for t in turns),
        "turns": turns,
    }
