"""The agent service's step: decide what an episode does next and hand it to the model or env."""

from __future__ import annotations

from typing import TYPE_CHECKING

import json
import time

from megaflow.services import lifecycle
from megaflow.core import states
from megaflow.agents import make_agent
from megaflow.core.errors import SpecError

if TYPE_CHECKING:
    from megaflow.services.root import Root as Runtime


def agent_step(rt: Runtime, episode_id: str, step: int) -> str:
    """Run step ``step`` of the episode's agent; return what it decided (for logs and tests).

    Limits end the episode with a cause: wall time -> TIMED_OUT/timeout, steps and tokens ->
    agent_limit, too many format errors in a row -> format.
    """
    ep = rt.engine.claim(episode_id, step, history="tail")  # decisions need the last record and counters
    if ep is None:
        return "dropped"
    if ep.fields.get("cancel") == "1":
        lifecycle.finish(rt, ep, states.CANCELLED, cause=states.CAUSE_CANCELLED)
        return "cancelled"
    spec = ep.spec
    agent = make_agent(spec.agent, rt.settings)
    budget = spec.agent.wall_time_s or rt.settings.episode_budget_s
    started = float(ep.fields.get("t:env_ready") or ep.fields.get("created_at") or time.time())
    if time.time() - started > budget:
        lifecycle.finish(rt, ep, states.TIMED_OUT, cause=states.CAUSE_TIMEOUT,
                         error=f"wall-time limit reached (agent budget of {budget:g}s used up)")
        return "timed_out"
    try:
        if not ep.history_len:
            rt.engine.advance(ep, history=agent.initial_messages(spec), next_task=lifecycle.to_model())
            return "model"
        tokens = int(ep.num("prompt_tokens") + ep.num("completion_tokens"))
        action = agent.decide(ep.history, tokens_used=tokens, model_calls=int(ep.num("model_calls")),
                              format_streak=int(ep.num("format_streak")))
    except SpecError as exc:  # a template that does not render: the task's fault, end it clearly
        lifecycle.finish(rt, ep, states.FAILED, cause=states.CAUSE_AGENT_CONFIG, error=str(exc))
        return "agent_config"
    if action.kind == "limit":
        lifecycle.finish(rt, ep, states.FAILED, cause=action.cause or states.CAUSE_AGENT_LIMIT, error=action.reason)
    elif action.kind == "model":
        rt.engine.advance(ep, next_task=lifecycle.to_model())
    elif action.kind == "exec":
        rt.engine.advance(ep, fields={"pending": json.dumps({"command": action.command}), "format_streak": "0"},
                          next_task=lifecycle.to_host(lifecycle.ENV_EXEC, ep.host))
    elif action.kind == "submit":
        rt.engine.advance(ep, state=states.EVALUATING, phase="evaluating", fields={"format_streak": "0"},
                          next_task=lifecycle.to_host(lifecycle.ENV_EVALUATE, ep.host))
    else:  # format_error: tell the model and ask again
        rt.engine.advance(ep, history=[{"role": "user", "content": action.message, "kind": "format_error"}],
                          incr={"format_errors": 1, "format_streak": 1}, next_task=lifecycle.to_model())
    return action.kind


class AgentService:
    """The agent service: decides each episode's next action."""

    def __init__(self, root: Runtime):
        self.root = root

    def step(self, episode_id: str, step: int) -> str:
        return agent_step(self.root, episode_id, step)
