"""Thin Celery tasks: check the payload, then call the service on this process's composition root.

Every step runs under the never-strand guard (megaflow.services.guard): an exception ends the
episode with a cause; a retryable one is retried by Celery first.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Task

from megaflow.core import wire
from megaflow.engine import delivery
from megaflow.services.guard import RETRYABLE, run_step
from megaflow.services.root import Root
from megaflow.workers.celery_app import app, settings

log = logging.getLogger(__name__)

MAX_RETRIES = 3
_root: Root | None = None
_pid: int | None = None
_identity: dict[str, Any] = {"role": "worker", "host": None}


def set_identity(role: str, host: str | None) -> None:
    """Name this worker's role and env host (before its root is first built)."""
    global _root
    _identity.update(role=role, host=host)
    _root = None


def root() -> Root:
    """This process's composition root, built on first use and again after a fork."""
    global _root, _pid
    if _root is None or _pid != os.getpid():
        _root = Root(settings(), role=_identity["role"], host=_identity["host"])
        _pid = os.getpid()
    return _root


def check_ids(episode_id: Any, step: Any) -> None:
    """Reject a malformed payload before it touches any state."""
    if not isinstance(episode_id, str) or not episode_id or len(episode_id) > 200:
        raise ValueError(f"episode_id must be a non-empty string, got {episode_id!r}")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")


def _delivery_tag(task: Task) -> str | None:
    """The broker delivery tag of the message this task runs for (kombu's Redis transport puts it in
    the message properties), or None when run another way (eagerly, by a test)."""
    tag = (getattr(task.request, "properties", None) or {}).get("delivery_tag")
    return tag if isinstance(tag, str) and tag else None


def _guarded(task: Task, kind: str, episode_id: str, step: int, fn, *, on_env_host: bool = False) -> str:
    check_ids(episode_id, step)
    final = task.request.retries >= MAX_RETRIES
    # the step's advance acknowledges this message in its own script (megaflow.engine.delivery)
    delivery.running(episode_id, step, _delivery_tag(task) if task.acks_late else None)
    try:
        return run_step(root(), kind, episode_id, step, fn, final_attempt=final, on_env_host=on_env_host)
    except RETRYABLE as exc:
        if final:
            raise
        countdown = min(60, 2 ** (task.request.retries + 1))
        log.warning(
            "episode %s: %s step %s: %s: %s; retry %d of %d in %ds",
            episode_id,
            kind,
            step,
            type(exc).__name__,
            exc,
            task.request.retries + 1,
            MAX_RETRIES,
            countdown,
        )
        raise task.retry(exc=exc, countdown=countdown, max_retries=MAX_RETRIES) from exc
    finally:
        delivery.done()


@app.task(name=wire.AGENT_STEP, bind=True)
def agent_step(self: Task, episode_id: str, step: int) -> str:
    """Decide an episode's next action."""
    return _guarded(self, "agent", episode_id, step, lambda: root().agent_service.step(episode_id, step))


@app.task(name=wire.MODEL_COMPLETE, bind=True)
def model_complete(self: Task, episode_id: str, step: int) -> str:
    """One chat-completion call of an episode (the backend retries within its own budget)."""
    return _guarded(self, "model", episode_id, step, lambda: root().model_service.step(episode_id, step))


@app.task(name=wire.MODEL_GATEWAY_CALL)
def model_gateway_call(episode_id: str, call_id: str) -> str:
    """One chat completion of an installed agent's gateway; the reply goes to the gateway's Redis list."""
    for name, value in (("episode_id", episode_id), ("call_id", call_id)):
        if not isinstance(value, str) or not value or len(value) > 200:
            raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    from megaflow.services.episode_gateway import EpisodeGateway

    return EpisodeGateway(root()).serve_call(episode_id, call_id)


@app.task(name=wire.ENV_PROVISION, bind=True)
def env_provision(self: Task, episode_id: str, step: int) -> str:
    """Create an episode's container and set it up."""
    final = self.request.retries >= MAX_RETRIES
    result = _guarded(
        self,
        "provision",
        episode_id,
        step,
        lambda: root().env_service.provision(episode_id, step, final_attempt=final),
        on_env_host=True,
    )
    if result == "boot_busy":  # the host's boot limiter is full: come back shortly, hold nothing
        self.apply_async(args=[episode_id, step], countdown=0.5, queue=wire.env_host_queue(root().host))
    return result


@app.task(name=wire.ENV_EXEC, bind=True)
def env_exec(self: Task, episode_id: str, step: int) -> str:
    """Run the agent's command in the episode's container."""
    final = self.request.retries >= MAX_RETRIES
    return _guarded(
        self,
        "exec",
        episode_id,
        step,
        lambda: root().env_service.execute(episode_id, step, final_attempt=final),
        on_env_host=True,
    )


@app.task(name=wire.ENV_EVALUATE, bind=True)
def env_evaluate(self: Task, episode_id: str, step: int) -> str:
    """Score the episode in a container."""
    final = self.request.retries >= MAX_RETRIES
    return _guarded(
        self,
        "evaluate",
        episode_id,
        step,
        lambda: root().env_service.evaluate(episode_id, step, final_attempt=final),
        on_env_host=True,
    )


@app.task(name=wire.ENV_CLOSE)
def env_close(episode_id: str, handle: dict) -> str:
    """Remove a finished episode's container and release its slots."""
    check_ids(episode_id, 0)
    if not isinstance(handle, dict) or not (handle.get("id") or handle.get("container_id")):
        raise ValueError("handle must be an env handle (a JSON object with an id)")
    return root().env_service.close(episode_id, handle)


@app.task(name=wire.ENV_PREFETCH)
def env_prefetch(images: list) -> dict:
    """Make images present on this env host (pull or keep), ahead of admissions."""
    if not isinstance(images, list) or not all(isinstance(i, str) and i for i in images):
        raise ValueError("images must be a list of image names")
    return root().env_service.prefetch(images)


@app.task(name=wire.ENV_SANDBOX_OP)
def env_sandbox_op(sandbox_id: str, op_id: str) -> str:
    """One sandbox-API operation on a container of this host; its reply goes to the caller's Redis list."""
    for name, value in (("sandbox_id", sandbox_id), ("op_id", op_id)):
        if not isinstance(value, str) or not value or len(value) > 200:
            raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    from megaflow.services.sandbox_api import SandboxHostOps

    return SandboxHostOps(root()).run(sandbox_id, op_id)


@app.task(name=wire.ENV_WATCH, bind=True)
def env_watch(self: Task, episode_id: str, step: int) -> str:
    """Check once whether an installed agent ended; while it runs, come back after a countdown (no slot held)."""
    from megaflow.services.installed import AGAIN, InstalledWatch

    result = _guarded(
        self, "watch", episode_id, step, lambda: InstalledWatch(root()).poll(episode_id, step), on_env_host=True
    )
    if result.startswith(AGAIN):
        self.apply_async(
            args=[episode_id, step], countdown=float(result[len(AGAIN) :]), queue=wire.env_host_queue(root().host)
        )
        return "waiting"
    return result
