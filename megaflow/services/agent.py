"""The agent service's step: ask the episode's agent what comes next and hand it to the model or env.

The agent (megaflow.agents: a registered type or a user's class) sees the newest history record
and its own JSON state (episode field ``agent_state``) and returns a Decision; this step applies
it in one advance: records appended, state saved, and the next task sent (model, env exec,
evaluation) or the episode finished. Observations are rendered here, by the agent, from the
raw command results the env step records.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

from megaflow.agents import Decision, StepContext, agent_class, make_agent
from megaflow.agents.base import END, EXEC, MODEL, SUBMIT, WAIT
from megaflow.core import states, wire
from megaflow.core.errors import SpecError
from megaflow.services import lifecycle

if TYPE_CHECKING:
    from megaflow.services.root import Root as Runtime

log = logging.getLogger(__name__)

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
    budget = _over_budget(rt, ep, now)
    if budget is not None:
        lifecycle.finish(
            rt,
            ep,
            states.TIMED_OUT,
            cause=states.CAUSE_TIMEOUT,
            error=f"wall-time limit reached (agent budget of {budget:g}s used up)",
        )
        return "timed_out"
    ctx = _context(rt, ep, ep.history, ep.history_len, now)
    try:
        decision = agent.decide(ctx)
    except SpecError as exc:  # e.g. a template that does not render: the task's fault, end it clearly
        lifecycle.finish(rt, ep, states.FAILED, cause=states.CAUSE_AGENT_CONFIG, error=str(exc))
        return "agent_config"
    return apply_decision(rt, ep, decision)


def _over_budget(rt: Runtime, ep: Any, now: float) -> float | None:
    """The episode's wall-time budget when it is used up, else None."""
    budget = ep.spec.agent.wall_time_s or rt.settings.episode_budget_s
    started = float(ep.fields.get("t:env_ready") or ep.fields.get("created_at") or now)
    return budget if now - started > budget else None


def _context(
    rt: Runtime,
    ep: Any,
    history: list[dict[str, Any]],
    history_len: int,
    now: float,
    *,
    incr: dict[str, float] | None = None,
    container: dict[str, Any] | None = None,
) -> StepContext:
    """What the agent sees: the episode's history (or its tail), state, counters (plus ``incr``) and sandbox."""
    incr = incr or {}
    return StepContext(
        task=ep.spec,
        history=history,
        history_len=history_len,
        state=json.loads(ep.fields.get("agent_state") or "{}"),
        counters={k: ep.num(k) + float(incr.get(k, 0)) for k in COUNTERS},
        container=container if container is not None else ep.container,
        settings=rt.settings,
        now=now,
    )


def decision_change(ep: Any, d: Decision) -> dict[str, Any]:
    """The advance (history, fields, counters, state, phase, next task) a model/exec/wait/submit decision makes."""
    fields: dict[str, Any] = {}
    if d.state is not None:
        fields["agent_state"] = wire.dumps(d.state)
    if d.request is not None:
        fields["agent_request"] = wire.dumps(d.request)
    change: dict[str, Any] = {"history": d.records, "fields": fields, "incr": d.incr}
    if d.next == MODEL:
        change["next_task"] = lifecycle.to_model()
    elif d.next == EXEC:
        fields["pending"] = wire.dumps(d.exec)
        change["next_task"] = lifecycle.to_host(lifecycle.ENV_EXEC, ep.host)
    elif d.next == WAIT:  # the program runs on in the sandbox; its env host polls for its end
        fields["pending"] = wire.dumps(d.exec or {})
        change["next_task"] = lifecycle.to_host(wire.ENV_WATCH, ep.host)
    elif d.next == SUBMIT:
        if d.submission is not None:
            fields["submission"] = d.submission
        change.update(
            state=states.EVALUATING, phase="evaluating", next_task=lifecycle.to_host(lifecycle.ENV_EVALUATE, ep.host)
        )
    else:
        raise ValueError(f"decision {d.next!r} is not applied by one advance")
    return change


def apply_decision(rt: Runtime, ep: Any, d: Decision) -> str:
    """One advance for the decision: history records, agent fields, counters, and the next task."""
    if d.next == END:
        fields: dict[str, Any] = {}
        if d.state is not None:
            fields["agent_state"] = wire.dumps(d.state)
        # what the agent said last goes into the trajectory first
        if (d.records or fields) and not rt.engine.advance(
            ep, history=d.records, fields=fields, incr=d.incr, keep_step=True
        ):
            return "dropped"
        lifecycle.finish(
            rt, ep, d.outcome or states.FAILED, cause=d.cause or states.CAUSE_AGENT_LIMIT, error=d.reason or None
        )
        return d.cause or "end"
    rt.engine.advance(ep, **decision_change(ep, d))
    return d.next


def advance_to_agent(
    rt: Runtime,
    ep: Any,
    *,
    history: list[dict[str, Any]],
    fields: dict[str, Any] | None = None,
    incr: dict[str, float] | None = None,
    state: str | None = None,
    phase: str | None = None,
    event_fields: dict[str, Any] | None = None,
) -> bool:
    """Apply a provision, model or exec step's results and hand the episode to its agent; whether it applied.

    With ``settings.agent_inline`` and an agent that declares ``inline = True`` (a cheap decision:
    the built-in ``bash`` and ``mini`` agents), the agent decides here, in the step's own process,
    and its decision goes into the same compare-and-set advance as the step's results, which sends
    the next task itself: one Celery task and two Redis round trips fewer per decision. Whatever
    the inline path cannot apply in one advance (cancel, a spent budget, an agent that raises or
    ends the episode) goes to the agent service as without it, which handles it the usual way.
    """
    step: dict[str, Any] = {"history": history, "fields": fields, "incr": incr, "state": state, "phase": phase}
    change = _inline_change(rt, ep, step) if rt.settings.agent_inline else None
    if change is None:
        return rt.engine.advance(ep, event_fields=event_fields, next_task=lifecycle.to_agent(), **step)
    return rt.engine.advance(ep, event_fields=event_fields, **change)


def _inline_change(rt: Runtime, ep: Any, step: dict[str, Any]) -> dict[str, Any] | None:
    """The step's advance merged with the inline agent's decision, or None for the agent service to decide."""
    if ep.fields.get("cancel") == "1":
        return None
    try:
        cls = agent_class(ep.spec.agent.type)
        if not getattr(cls, "inline", False):  # asked of the class: an agent that is not inline is never built here
            return None
        agent = cls(ep.spec.agent, rt.settings)
    except Exception:  # the agent service ends it with the cause
        return None
    now = time.time()
    if _over_budget(rt, ep, now) is not None:
        return None
    # the records as the agent service would read them back: stamped and through JSON
    records = [json.loads(wire.dumps(dict(rec, t=rec.get("t", now)))) for rec in step["history"]]
    if getattr(agent, "needs_history", "tail") == "all":
        seen = ep.history if len(ep.history) == ep.history_len else None
        if seen is None:  # the caller read only the tail: the agent service reads it all
            return None
        history = seen + records
    else:
        history = records[-1:] or ep.history[-1:]
    fields = step["fields"] or {}
    container = fields.get("container")
    if isinstance(container, str):
        container = json.loads(container)
    ctx = _context(rt, ep, history, ep.history_len + len(records), now, incr=step["incr"], container=container)
    try:
        decision = agent.decide(ctx)
    except Exception:  # the agent service decides again and ends the episode with the cause
        log.debug("episode %s: inline decision raised; the agent service takes it", ep.id, exc_info=True)
        return None
    if decision.next not in (MODEL, EXEC, WAIT, SUBMIT):
        return None  # ending: the agent service writes the last records and finishes it
    if decision.next != MODEL and not ep.host:
        return None  # no env host recorded yet to send the command to
    d = decision_change(ep, decision)
    merged_incr = dict(step["incr"] or {})
    for k, v in (d["incr"] or {}).items():
        merged_incr[k] = merged_incr.get(k, 0) + v
    phases = [p for p in (step["phase"], d.get("phase")) if p]
    return {
        "history": [*records, *(d["history"] or [])],
        "fields": {**fields, **d["fields"]},
        "incr": merged_incr,
        "state": d.get("state") or step["state"],
        "phase": phases[-1] if phases else None,
        "also_phases": phases[:-1],
        "next_task": d["next_task"],
    }


class AgentService:
    """The agent service: decides each episode's next action."""

    def __init__(self, root: Runtime):
        self.root = root

    def step(self, episode_id: str, step: int) -> str:
        return agent_step(self.root, episode_id, step)
