"""The model service's step: one chat-completion call for an episode, recorded on its history."""

from __future__ import annotations

from typing import TYPE_CHECKING

from megaflow.services import lifecycle
from megaflow.core import states
from megaflow.core.errors import ContextLengthError, ModelError, RetryableError
from megaflow.model_gateway.base import ModelRequest

CHAT_KEYS = ("role", "content")

if TYPE_CHECKING:
    from megaflow.services.root import Root as Runtime


def model_step(rt: Runtime, episode_id: str, step: int, *, final_attempt: bool = True) -> str:
    """Ask the episode's model for its next reply; retryable failures propagate to Celery."""
    ep = rt.engine.claim(episode_id, step)
    if ep is None:
        return "dropped"
    spec = ep.spec
    model = spec.model.model_dump(exclude_none=True)
    backend_name = model.pop("backend", None) or rt.settings.model_backend
    request = ModelRequest(
        messages=[{k: m[k] for k in CHAT_KEYS if k in m} for m in ep.history],
        model=model,
        session_id=ep.id,
        step=step,
        policy_version=ep.fields.get("policy_version") or None,
    )
    try:
        reply = rt.backend(backend_name).complete(request)
    except ContextLengthError as exc:
        lifecycle.finish(rt, ep, states.FAILED, cause=states.CAUSE_CONTEXT, error=str(exc))
        return "context_length"
    except RetryableError as exc:
        if not final_attempt:
            raise
        lifecycle.finish(rt, ep, states.FAILED, cause=states.CAUSE_INFRA, error=f"model: {exc}")
        return "infra"
    except ModelError as exc:
        lifecycle.finish(rt, ep, states.FAILED, cause=states.CAUSE_MODEL, error=str(exc))
        return "model_error"
    record = {"role": "assistant", "content": reply.content, "step": step,
              **{k: v for k, v in reply.to_json().items() if k != "content" and v is not None}}
    rt.engine.advance(
        ep, history=[record], phase=f"step_{int(ep.num('model_calls')) + 1}",
        incr={"model_calls": 1, "prompt_tokens": reply.prompt_tokens,
              "completion_tokens": reply.completion_tokens, "model_latency_s": reply.latency_s},
        next_task=lifecycle.to_agent(),
    )
    return "ok"


class ModelService:
    """The model service: one chat-completion call per step."""

    def __init__(self, root: Runtime):
        self.root = root

    def step(self, episode_id: str, step: int) -> str:
        return model_step(self.root, episode_id, step)
