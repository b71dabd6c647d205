"""The agent service's step: ask the episode's agent what comes next and hand it to the model or env.

The agent (megaflow.agents: a registered type or a user's class) sees the newest history record
and its own JSON state (episode field ``agent_state``) and returns a Decision; this step applies
it in one advance: records appended, state saved, and the next task sent (model, env exec,
evaluation) or the episode finished. Observations are rendered here, by the agent, from the
raw command results the env step records.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from megaflow.agents import Decision, StepContext, make_agent
from megaflow.agents.base import END, EXEC, MODEL, SUBMIT, WAIT
from megaflow.core import states, wire
from megaflow.core.errors import SpecError
from megaflow.services import lifecycle

if TYPE_CHECKING:
    from megaflow.services.root import Root as Runtime

COUNTERS = ("model_calls", "prompt_tokens", "completion_tokens", "format_errors")


def agent_step(rt: Runtime, episode_id: str, step: int) -> str:
    """Run step ``step`` of the episode's agent; return what it decided (for logs and tests).

    The episode's wall-time budget (agent.wall_time_s, else settings.episode_budget_s) ends it
    TIMED_OUT/timeout; an agent section that cannot be loaded ends it FAILED/agent_config.
    """
    ep = rt.engine.claim(episode_id, step, history="tail")
    if ep is None:
        return "dropped"
    if ep.fields.get("cancel") == "1":
        lifecycle.finish(rt, ep, states.CANCELLED, cause=states.CAUSE_CANCELLED)
        return "cancelled"
    spec = ep.spec
    try:
        agent = make_agent(spec.agent, rt.settings)
    except SpecError as exc:
        lifecycle.finish(rt, ep, states.FAILED, cause=states.CAUSE_AGENT_CONFIG, error=str(exc))
        return "agent_config"
    if getattr(agent, "needs_history", "tail") == "all" and ep.history_len > 1:
        ep = rt.engine.claim(episode_id, step, history=True) or ep
    now = time.time()
    budget = spec.agent.wall_time_s or rt.settings.episode_budget_s
    started = float(ep.fields.get("t:env_ready") or ep.fields.get("created_at") or now)
    if now - started > budget:
        lifecycle.finish(
            rt,
            ep,
            states.TIMED_OUT,
            cause=states.CAUSE_TIMEOUT,
            error=f"wall-time limit reached (agent budget of {budget:g}s used up)",
        )
        return "timed_out"
    ctx = StepContext(
        task=spec,
        history=ep.history,
        history_len=ep.history_len,
        state=json.loads(ep.fields.get("agent_state") or "{}"),
        counters={k: ep.num(k) for k in COUNTERS},
        container=ep.container,
        settings=rt.settings,
        now=now,
    )
    try:
        decision = agent.decide(ctx)
    except SpecError as exc:  # e.g. a template that does not render: the task's fault, end it clearly
        lifecycle.finish(rt, ep, states.FAILED, cause=states.CAUSE_AGENT_CONFIG, error=str(exc))
        return "agent_config"
    return apply_decision(rt, ep, decision)


def apply_decision(rt: Runtime, ep: Any, d: Decision) -> str:
    """One advance for the decision: history records, agent fields, counters, and the next task."""
    fields: dict[str, Any] = {}
    if d.state is not None:
        fields["agent_state"] = wire.dumps(d.state)
    if d.request is not None:
        fields["agent_request"] = wire.dumps(d.request)
    if d.next == MODEL:
        rt.engine.advance(ep, history=d.records, fields=fields, incr=d.incr, next_task=lifecycle.to_model())
    elif d.next == EXEC:
        fields["pending"] = wire.dumps(d.exec)
        rt.engine.advance(
            ep, history=d.records, fields=fields, incr=d.incr, next_task=lifecycle.to_host(lifecycle.ENV_EXEC, ep.host)
        )
    elif d.next == WAIT:  # the program runs on in the sandbox; its env host polls for its end
        fields["pending"] = wire.dumps(d.exec or {})
        rt.engine.advance(
            ep, history=d.records, fields=fields, incr=d.incr, next_task=lifecycle.to_host(wire.ENV_WATCH, ep.host)
        )
    elif d.next == SUBMIT:
        if d.submission is not None:
            fields["submission"] = d.submission
        rt.engine.advance(
            ep,
            history=d.records,
            fields=fields,
            incr=d.incr,
            state=states.EVALUATING,
            phase="evaluating",
            next_task=lifecycle.to_host(lifecycle.ENV_EVALUATE, ep.host),
        )
    elif d.next == END:
        # what the agent said last goes into the trajectory first
        if (d.records or fields) and not rt.engine.advance(
            ep, history=d.records, fields=fields, incr=d.incr, keep_step=True
        ):
            return "dropped"
        lifecycle.finish(
            rt, ep, d.outcome or states.FAILED, cause=d.cause or states.CAUSE_AGENT_LIMIT, error=d.reason or None
        )
        return d.cause or "end"
    return d.next


class AgentService:
    """The agent service: decides each episode's next action."""

    def __init__(self, root: Runtime):
        self.root = root

    def step(self, episode_id: str, step: int) -> str:
        return agent_step(self.root, episode_id, step)
