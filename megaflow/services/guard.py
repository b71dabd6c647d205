"""Never strand an episode: whatever a step raises ends that episode with a cause, within the step.

Retryable failures (a lost Redis connection, a retryable infrastructure error) go back to the
caller to retry while attempts remain; on the last attempt they end the episode as ``infra``. Any
other exception ends it as ``internal`` with the step and the message. If even that cannot reach
Redis, the exception propagates and the task's message stays unacknowledged for redelivery.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import redis

from megaflow.core import states
from megaflow.core.errors import RetryableError

if TYPE_CHECKING:
    from megaflow.services.root import Root

log = logging.getLogger(__name__)

# Raised by a step, these are worth another attempt of the same step.
RETRYABLE: tuple[type[BaseException], ...] = (RetryableError, redis.ConnectionError, redis.TimeoutError)


def run_step(
    root: Root,
    kind: str,
    episode_id: str,
    step: int,
    fn: Callable[[], str],
    *,
    final_attempt: bool = True,
    on_env_host: bool = False,
) -> str:
    """Run ``fn`` (one step of ``kind``); end the episode with a cause if it raises."""
    try:
        return fn()
    except RETRYABLE as exc:
        if not final_attempt:
            raise
        cause, error = states.CAUSE_INFRA, f"{kind} step {step}: {exc} (retries spent)"
    except Exception as exc:
        log.exception("episode %s: %s step %s raised", episode_id, kind, step)
        cause, error = states.CAUSE_INTERNAL, f"{kind} step {step}: {type(exc).__name__}: {exc}"
    root.lifecycle.fail(episode_id, step, cause=cause, error=error, close_here=on_env_host)
    return "failed"
