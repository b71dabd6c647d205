"""mini-swe-agent's own model classes, fed the reply MegaFlow's model service recorded.

The agent step never calls an API: it builds the model class the config names (as mini's
``get_model`` would), hands it the recorded reply as the response its ``_query`` would have
returned, and lets mini's own ``query`` parse actions, compute the cost and raise ``FormatError``.
Two response shapes exist in mini 2.4: litellm's ``ModelResponse`` (litellm, litellm_textbased;
portkey, whose transport MegaFlow replaces, parses the same way) and the plain JSON dict
(openrouter, openrouter_textbased, requesty).
"""

from __future__ import annotations

import copy
from typing import Any

from megaflow.agents.mini import DICT, LITELLM, SUPERSEDED, import_mini, model_family, resolve_model_class  # noqa: F401

MESSAGE_FIELDS = ("role", "content", "tool_calls", "function_call", "reasoning_content", "thinking_blocks")


def build_model(model_cfg: dict[str, Any], default_name: str) -> Any:
    """The model object mini's ``get_model`` would build from this config (nothing is called yet)."""
    name = str(model_cfg.get("model_class") or "litellm")
    cls = resolve_model_class(name)
    config = {k: copy.deepcopy(v) for k, v in model_cfg.items() if k != "model_class" and k not in SUPERSEDED["model"]}
    config["model_name"] = config.get("model_name") or default_name
    lowered = config["model_name"].lower()
    if any(s in lowered for s in ("anthropic", "sonnet", "opus", "claude")) and "set_cache_control" not in config:
        config["set_cache_control"] = "default_end"  # as mini's get_model does
    return cls(**config)


def response_json(record: dict[str, Any], model_name: str) -> dict[str, Any]:
    """An OpenAI chat-completion response rebuilt from the model service's assistant record."""
    if isinstance(record.get("message"), dict):
        message = dict(record["message"])
    else:
        message = {k: record[k] for k in MESSAGE_FIELDS if record.get(k) is not None}
    message.setdefault("role", "assistant")
    message.setdefault("content", None)
    usage = record.get("usage") if isinstance(record.get("usage"), dict) else None
    if usage is None:
        p, c = int(record.get("prompt_tokens") or 0), int(record.get("completion_tokens") or 0)
        usage = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
    return {
        "id": str(record.get("id") or f"megaflow-{record.get('step', 0)}"),
        "object": "chat.completion",
        "created": int(float(record.get("t") or 0)),
        "model": record.get("model_name") or model_name,
        "choices": [{"index": 0, "message": message, "finish_reason": record.get("finish_reason")}],
        "usage": usage,
    }


def replay(model: Any, record: dict[str, Any]) -> dict[str, Any]:
    """mini's ``model.query`` on the recorded reply: the message (with ``extra.actions``/``cost``) or FormatError."""
    family, _ = model_family_of(model)
    raw = response_json(record, model.config.model_name)
    if family == LITELLM:
        import litellm

        response: Any = litellm.ModelResponse(**raw)
    else:
        response = raw
    model._query = lambda messages, **kwargs: response
    return model.query([])


def model_family_of(model: Any) -> tuple[str, bool]:
    from minisweagent.models.litellm_model import LitellmModel
    from minisweagent.models.litellm_textbased_model import LitellmTextbasedModel
    from minisweagent.models.openrouter_textbased_model import OpenRouterTextbasedModel

    textbased = isinstance(model, (LitellmTextbasedModel, OpenRouterTextbasedModel))
    return (LITELLM if isinstance(model, LitellmModel) else DICT), not textbased


def request_options(model: Any) -> dict[str, Any]:
    """What every model request of the episode carries: mini's tool (tool-call classes) and model_kwargs."""
    from minisweagent.models.utils.actions_toolcall import BASH_TOOL

    from megaflow.agents.mini import CONSUMED_KWARGS

    options = {k: copy.deepcopy(v) for k, v in (model.config.model_kwargs or {}).items() if k not in CONSUMED_KWARGS}
    if model_family_of(model)[1]:
        options["tools"] = [copy.deepcopy(BASH_TOOL)]
    if getattr(model.config, "set_cache_control", None):
        options["cache_control"] = model.config.set_cache_control
    return options
