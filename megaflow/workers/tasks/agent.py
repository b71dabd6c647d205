"""Agent-queue tasks."""

from __future__ import annotations

from celery import Celery

from megaflow.services import root as runtime
from megaflow.services.agent import agent_step
from megaflow.workers.tasks.common import check_ids


def register(app: Celery) -> None:
    @app.task(name="megaflow.agent.step")
    def step(episode_id: str, step: int) -> str:
        """Decide an episode's next action."""
        check_ids(episode_id, step)
        return agent_step(runtime.current(), episode_id, step)
