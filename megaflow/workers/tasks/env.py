"""Env-queue tasks: provisioning and operations on containers of one host (queue env.<host>)."""

from __future__ import annotations

from celery import Celery

from megaflow.services import root as runtime
from megaflow.workers.app import env_host_queue
from megaflow.services import env as steps
from megaflow.workers.tasks.common import RETRY_OPTS, check_ids, final_attempt


def register(app: Celery) -> None:
    @app.task(name="megaflow.env.provision", **RETRY_OPTS)
    def provision(self, episode_id: str, step: int) -> str:
        """Create an episode's container and set it up."""
        check_ids(episode_id, step)
        result = steps.provision(runtime.current(), episode_id, step, final_attempt=final_attempt(self))
        if result == steps.BOOT_BUSY:  # the host's boot limiter is full: come back shortly, hold nothing
            self.apply_async(args=[episode_id, step], countdown=0.5,
                             queue=env_host_queue(runtime.current().host))
        return result

    @app.task(name="megaflow.env.exec", **RETRY_OPTS)
    def exec_(self, episode_id: str, step: int) -> str:
        """Run the agent's command in the episode's container."""
        check_ids(episode_id, step)
        return steps.execute(runtime.current(), episode_id, step, final_attempt=final_attempt(self))

    @app.task(name="megaflow.env.evaluate", **RETRY_OPTS)
    def evaluate(self, episode_id: str, step: int) -> str:
        """Score the episode in its container."""
        check_ids(episode_id, step)
        return steps.evaluate(runtime.current(), episode_id, step, final_attempt=final_attempt(self))

    @app.task(name="megaflow.env.close")
    def close(episode_id: str, handle: dict) -> str:
        """Remove a finished episode's container and release its slots."""
        check_ids(episode_id, 0)
        if not isinstance(handle, dict) or "container_id" not in handle:
            raise ValueError("handle must be a container handle with container_id")
        return steps.close(runtime.current(), episode_id, handle)

    @app.task(name="megaflow.env.prefetch")
    def prefetch(images: list) -> dict:
        """Make images present on this env host (pull or keep), ahead of admissions."""
        if not isinstance(images, list) or not all(isinstance(i, str) and i for i in images):
            raise ValueError("images must be a list of image names")
        from megaflow.env_hosts.images import prefetch as do_prefetch

        return do_prefetch(runtime.current().env_host, images)
