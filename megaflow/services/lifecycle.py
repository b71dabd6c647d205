"""Episode lifecycle across services: admission, finishing on every exit path, cancel, releasing.

``Lifecycle.finish`` is the one place that ends an episode, whatever ended it (a result, a limit,
an exception in any step, a cancel, the guard): it saves the trajectory, marks the episode
terminal with a compare-and-set, removes its container and releases its slots.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from megaflow.core import states, wire
from megaflow.core.errors import NotFoundError
from megaflow.engine.admission import ADMIT_CHUNK
from megaflow.engine.admission import admit as admit_queued
from megaflow.engine.episodes import Episode, NextTask, to_agent, to_host, to_model

if TYPE_CHECKING:
    from megaflow.services.root import Root

log = logging.getLogger(__name__)

__all__ = [
    "Lifecycle",
    "admit",
    "finish",
    "release",
    "close_container",
    "to_agent",
    "to_host",
    "to_model",
    "NextTask",
    "trajectory",
]

CANCEL_ATTEMPTS = 20  # compare-and-set retries while the episode keeps moving under a cancel


def trajectory(ep: Episode) -> dict[str, Any]:
    """The episode's whole record as one JSON document (the trajectory artifact)."""
    from megaflow.agents.trajectory import token_data, trajectory_steps
    from megaflow.engine.episodes import episode_view

    spec = ep.spec.model_dump(mode="json") if ep.fields.get("spec") else {}  # stored without its defaults
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


class Lifecycle:
    """Admits, finishes, fails, cancels and releases episodes."""

    def __init__(self, root: Root):
        self.root = root
        self.engine = root.engine
        self.resources = root.resources
        self.dispatcher = root.dispatcher

    def admit(self, max_n: int = ADMIT_CHUNK) -> int:
        """Admit what capacity allows and send each admitted episode's first task; return the count."""
        return admit_queued(self.engine, self.resources, max_n)

    def finish(
        self,
        ep: Episode,
        state: str,
        *,
        reward: float | None = None,
        cause: str | None = None,
        error: str | None = None,
        close_here: bool = False,
        history: list[dict[str, Any]] | None = None,
        fields: dict[str, Any] | None = None,
        loaded: bool = False,
    ) -> bool:
        """End the episode: save its trajectory, mark it terminal, then close its container and release.

        ``close_here`` is for callers on the episode's env host (they remove the container in-process);
        elsewhere the close is sent to ``env.<host>``. ``history`` and ``fields`` are what the ending
        step adds (the evaluation's record and scores), written by the same advance that ends it.
        ``loaded``: ``ep`` was just read with its whole history, so it is not read again (the advance
        still checks that the episode did not move). Returns False if another task ended it first.
        """
        if not loaded:
            current = self.engine.load(ep.id)  # the whole history (callers may hold only its tail)
            if current.step != ep.step or current.terminal:  # another task moved the episode on: not ours to end
                return False
            ep = current
        now = time.time()
        records = [dict(rec, t=rec.get("t", now)) for rec in (history or [])]
        if records:
            ep = replace(ep, history=[*ep.history, *records])
        fields = {
            **(fields or {}),
            "reward": "" if reward is None else str(reward),
            "cause": cause or "",
            "error": (error or "")[:2000],
        }
        view = trajectory(ep)
        view.update(state=state, reward=reward, cause=cause, error=error)
        uri = None
        try:
            key = f"trajectories/{ep.batch_id}/{ep.id}.json"
            uri = self.root.artifacts.put_bytes(key, json.dumps(view).encode(), content_type="application/json")
            fields["artifact_uri"] = uri
        except Exception as exc:  # an artifact outage must not keep the episode (and its slots) alive
            log.exception("episode %s: trajectory not saved: %s", ep.id, exc)
        applied = self.engine.advance(
            ep,
            history=records,
            state=state,
            phase="finished",
            fields=fields,
            terminal=True,
            event_fields={
                "reward": reward,
                "cause": cause,
                "error": fields["error"] or None,
                "artifact_uri": uri,
                "steps": int(ep.num("model_calls")),
                "prompt_tokens": int(ep.num("prompt_tokens")),
                "completion_tokens": int(ep.num("completion_tokens")),
                "resolved": (view.get("report") or {}).get("resolved"),
            },
        )
        if not applied:
            return False
        handle = ep.container
        if handle and close_here:
            self.close_container(ep.id, handle)
        elif handle:
            self.dispatcher.send(wire.ENV_CLOSE, [ep.id, handle], wire.env_host_queue(handle.get("host") or ep.host))
        else:
            self.release(ep.id)
        return True

    def fail(self, episode_id: str, step: int, *, cause: str, error: str, close_here: bool = False) -> bool:
        """End an episode still at ``step`` as FAILED with ``cause`` (a step raised); False if it moved on."""
        try:
            ep = self.engine.load(episode_id, history=False)
        except NotFoundError:
            return False
        if ep.terminal or ep.step != step:
            return False
        return self.finish(ep, states.FAILED, cause=cause, error=error, close_here=close_here)

    def cancel(self, episode_id: str, error: str = "cancelled by request") -> bool:
        """End a live episode as CANCELLED now, whatever its state; False if it was already final.

        A task in flight for it finds the episode terminal and drops its result; its container is
        removed by the close task (a running command or evaluation dies with it).
        """
        for _ in range(CANCEL_ATTEMPTS):
            try:
                ep = self.engine.load(episode_id, history=False)
            except NotFoundError:
                return False
            if ep.terminal:
                return False
            if self.finish(ep, states.CANCELLED, cause=states.CAUSE_CANCELLED, error=error):
                return True
        raise RuntimeError(f"episode {episode_id} kept moving; cancel did not take after {CANCEL_ATTEMPTS} tries")

    def close_container(self, episode_id: str, handle: dict[str, Any]) -> None:
        """Remove the episode's container (on this host), then release its slots."""
        host = self.root.env_host
        try:
            host.close(handle)
            close_all = getattr(host, "close_episode", None)  # any other sandbox of it (a fresh evaluation one)
            if close_all is not None:
                close_all(episode_id)
        except Exception:
            log.exception("episode %s: closing %s failed; the reaper will remove it", episode_id, handle.get("id"))
        self.release(episode_id)

    def release(self, episode_id: str) -> None:
        """Give back every slot the episode holds (and its FIFO place), then admit what that frees
        (nothing to admit, and no round trip for it, when no episode waits)."""
        if self.resources.release(episode_id):
            self.admit()


# Function forms, for step code written as functions of the root.
def admit(rt: Root, max_n: int = ADMIT_CHUNK) -> int:
    return rt.lifecycle.admit(max_n)


def finish(rt: Root, ep: Episode, state: str, **kwargs: Any) -> bool:
    return rt.lifecycle.finish(ep, state, **kwargs)


def close_container(rt: Root, episode_id: str, handle: dict[str, Any]) -> None:
    rt.lifecycle.close_container(episode_id, handle)


def release(rt: Root, episode_id: str) -> None:
    rt.lifecycle.release(episode_id)


PROVISION = wire.ENV_PROVISION
AGENT_STEP = wire.AGENT_STEP
MODEL_COMPLETE = wire.MODEL_COMPLETE
ENV_EXEC = wire.ENV_EXEC
ENV_EVALUATE = wire.ENV_EVALUATE
ENV_CLOSE = wire.ENV_CLOSE
