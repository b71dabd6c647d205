"""Model-queue tasks."""

from __future__ import annotations

from celery import Celery

from megaflow.services import root as runtime
from megaflow.services.model import model_step
from megaflow.workers.tasks.common import RETRY_OPTS, check_ids, final_attempt


def register(app: Celery) -> None:
    @app.task(name="megaflow.model.complete", **RETRY_OPTS)
    def complete(self, episode_id: str, step: int) -> str:
        """One chat-completion call of an episode."""
        check_ids(episode_id, step)
        return model_step(runtime.current(), episode_id, step, final_attempt=final_attempt(self))
