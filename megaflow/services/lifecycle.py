"""Episode lifecycle across services: admission, finishing on every exit path, releasing slots.

Admission runs on events (a submit, a release, a host joining) from whichever process saw the
event; finishing is the one place that ends an episode, whatever ended it.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from megaflow.core import states
from megaflow.workers.app import env_host_queue
from megaflow.engine.episodes import Episode, NextTask
from megaflow.services.root import Runtime

log = logging.getLogger(__name__)

PROVISION = "megaflow.env.provision"
AGENT_STEP = "megaflow.agent.step"
MODEL_COMPLETE = "megaflow.model.complete"
ENV_EXEC = "megaflow.env.exec"
ENV_EVALUATE = "megaflow.env.evaluate"
ENV_CLOSE = "megaflow.env.close"


def to_agent() -> NextTask:
    from megaflow.workers.app import AGENT_QUEUE

    return NextTask(AGENT_STEP, AGENT_QUEUE)


def to_model() -> NextTask:
    from megaflow.workers.app import MODEL_QUEUE

    return NextTask(MODEL_COMPLETE, MODEL_QUEUE)


def to_host(name: str, host: str) -> NextTask:
    return NextTask(name, env_host_queue(host))


def admit(rt: Runtime, max_n: int = 100) -> int:
    """Admit what capacity allows and send each admitted episode's first task; return the count."""
    total = 0
    while True:
        admissions = rt.resources.admit(max_n)
        for a in admissions:
            try:
                ep = rt.engine.load(a.episode_id, history=False)
            except Exception:
                rt.resources.release(a.episode_id)
                continue
            ok = rt.engine.advance(
                ep, keep_step=True, state=states.ADMITTED, phase="admitted",
                fields={"host": a.host}, event_fields={"host": a.host},
                next_task=to_host(PROVISION, a.host),
            )
            if not ok:  # cancelled or finished while queued
                rt.resources.release(a.episode_id)
            else:
                total += 1
        if len(admissions) < max_n:
            return total


def trajectory(ep: Episode) -> dict[str, Any]:
    """The episode's whole record as one JSON document (the trajectory artifact)."""
    from megaflow.agents.trajectory import token_data, trajectory_steps
    from megaflow.engine.episodes import episode_view

    spec = json.loads(ep.fields.get("spec", "{}"))
    report = next((m.get("report") for m in reversed(ep.history) if m.get("role") == "evaluation"), None)
    return {
        **episode_view(ep),
        "spec": spec,
        "policy_version": ep.fields.get("policy_version") or None,
        "messages": ep.history,
        "steps": trajectory_steps(ep.history),
        "tokens": token_data(ep.history),
        "report": report,
    }


def finish(
    rt: Runtime,
    ep: Episode,
    state: str,
    *,
    reward: float | None = None,
    cause: str | None = None,
    error: str | None = None,
    close_here: bool = False,
) -> bool:
    """End the episode: save its trajectory, mark it terminal, then close its container and release.

    ``close_here`` is for callers already on the episode's env host (they remove the container
    in-process); elsewhere the close is sent to ``env.<host>``. Returns False if another task
    ended the episode first.
    """
    current = rt.engine.load(ep.id)  # the whole history, for the trajectory (callers may hold only its tail)
    if current.step != ep.step or current.terminal:  # another task moved the episode on: not ours to end
        return False
    ep = current
    fields: dict[str, Any] = {"reward": "" if reward is None else str(reward), "cause": cause or "",
                              "error": (error or "")[:2000]}
    view = trajectory(ep)
    view.update(state=state, reward=reward, cause=cause, error=error)
    uri = None
    try:
        key = f"trajectories/{ep.batch_id}/{ep.id}.json"
        uri = rt.artifacts.put_bytes(key, json.dumps(view).encode(), content_type="application/json")
        fields["artifact_uri"] = uri
    except Exception as exc:  # an artifact outage must not keep the episode (and its slots) alive
        log.exception("episode %s: trajectory not saved: %s", ep.id, exc)
    applied = rt.engine.advance(
        ep, state=state, phase="finished", fields=fields, terminal=True,
        event_fields={"reward": reward, "cause": cause, "error": fields["error"] or None, "artifact_uri": uri,
                      "steps": int(ep.num("model_calls")), "prompt_tokens": int(ep.num("prompt_tokens")),
                      "completion_tokens": int(ep.num("completion_tokens")),
                      "resolved": (view.get("report") or {}).get("resolved")},
    )
    if not applied:
        return False
    handle = ep.container
    if handle and close_here:
        close_container(rt, ep.id, handle)
    elif handle:
        rt.send(ENV_CLOSE, [ep.id, handle], env_host_queue(handle.get("host") or ep.host))
    else:
        release(rt, ep.id)
    return True


def close_container(rt: Runtime, episode_id: str, handle: dict[str, Any]) -> None:
    """Remove the episode's container (on this host), then release its slots."""
    try:
        rt.env_host.close(handle)
    except Exception:
        log.exception("episode %s: closing container %s failed; the reaper will remove it",
                      episode_id, handle.get("container_id"))
    release(rt, episode_id)


def release(rt: Runtime, episode_id: str) -> None:
    """Give back every slot the episode holds, then admit what that frees."""
    rt.resources.release(episode_id)
    admit(rt)
