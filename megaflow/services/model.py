"""The model service's step: one chat-completion call for an episode, recorded on its history.

The backend owns every retry (one budget per call, see megaflow.model_gateway.openai); this step
turns the outcome into the episode's next state: the reply on the history, or the episode ended
with the cause of the model error's class (megaflow.model_gateway.errors).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import redis

from megaflow.agents import build_request
from megaflow.core import states
from megaflow.core.errors import ModelError, ModelUnavailableError
from megaflow.model_gateway.base import ModelRequest
from megaflow.model_gateway.errors import cause_of
from megaflow.services import lifecycle
from megaflow.services.agent import advance_to_agent


def _call_params(raw: str | None) -> dict:
    """Per-call request fields an agent left on the episode (``model_params``: a JSON object), if any."""
    if not raw:
        return {}
    try:
        params = json.loads(raw)
    except ValueError:
        return {}
    return params if isinstance(params, dict) else {}


if TYPE_CHECKING:
    from megaflow.services.root import Root as Runtime


def model_step(rt: Runtime, episode_id: str, step: int, *, final_attempt: bool = True) -> str:
    """Ask the episode's model for its next reply; a model error of any class ends the episode with its cause.

    ``final_attempt`` is kept for the task's signature: the backend spends the one retry budget, so
    a spent budget ends the episode (cause infra) whatever it says.
    """
    ep = rt.engine.claim(episode_id, step)
    if ep is None:
        return "dropped"
    model = ep.spec.model.model_dump(exclude_none=True)
    backend_name = model.pop("backend", None) or rt.settings.model_backend
    # the agent's request (messages, tools, its model kwargs); the spec's model section stays on top
    built = build_request(ep.history, _call_params(ep.fields.get("agent_request")))
    # already chat messages (build_request keeps only the keys a chat API takes, and the cache marks
    # mini-swe-agent sets), shared with the conversation's memo: nothing per message is redone here
    messages = built.pop("messages")
    params = {k: v for k, v in built.items() if k not in model}
    params.update(_call_params(ep.fields.get("model_params")))
    request = ModelRequest(
        messages=messages,
        model=model,
        session_id=ep.id,
        step=step,
        policy_version=ep.fields.get("policy_version") or None,
        batch_id=ep.batch_id,
        params=params,
        call_index=int(ep.num("model_calls")),
    )
    try:
        reply = rt.backend(backend_name).complete(request)
    except ModelUnavailableError as exc:  # the retry budget is spent (or Redis is out): infrastructure
        if isinstance(exc.__cause__, redis.RedisError) and not final_attempt:
            raise  # Redis itself is out: nothing can be recorded now; the step is redelivered later
        lifecycle.finish(rt, ep, states.FAILED, cause=states.CAUSE_INFRA, error=f"model: {exc}")
        return states.CAUSE_INFRA
    except ModelError as exc:
        cause = cause_of(exc)
        lifecycle.finish(rt, ep, states.FAILED, cause=cause, error=f"model: {exc}")
        return cause
    advance_to_agent(
        rt,
        ep,
        history=[reply.history_record(step)],
        phase=f"step_{int(ep.num('model_calls')) + 1}",
        incr={
            "model_calls": 1,
            "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": reply.completion_tokens,
            "model_latency_s": reply.latency_s,
        },
    )
    return "ok"


class ModelService:
    """The model service: one chat-completion call per step."""

    def __init__(self, root: Runtime):
        self.root = root

    def step(self, episode_id: str, step: int) -> str:
        return model_step(self.root, episode_id, step)
