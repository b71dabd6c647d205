"""Helpers shared by the task modules."""

from __future__ import annotations

from typing import Any

from megaflow.core.errors import RetryableError

RETRY_OPTS: dict[str, Any] = {
    "bind": True,
    "autoretry_for": (RetryableError,),
    "max_retries": 3,
    "retry_backoff": 2,
    "retry_backoff_max": 60,
    "retry_jitter": True,
}


def check_ids(episode_id: Any, step: Any) -> None:
    """Reject a malformed payload before it touches any state."""
    if not isinstance(episode_id, str) or not episode_id or len(episode_id) > 200:
        raise ValueError(f"episode_id must be a non-empty string, got {episode_id!r}")
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")


def final_attempt(task) -> bool:
    return task.request.retries >= (task.max_retries or 0)
