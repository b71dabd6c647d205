"""Every Redis key name MegaFlow uses, in one place.

All keys start with the configured prefix (``Settings.key_prefix``, default ``mf``) so several
fleets can share one Redis. Modules that own keys list them in their class docstring.
"""

from __future__ import annotations


class Keys:
    """Key names under one prefix."""

    def __init__(self, prefix: str = "mf"):
        self.prefix = prefix

    # --- episodes (megaflow.engine.episodes) -------------------------------------------------------------
    def episode(self, episode_id: str) -> str:
        """Hash: episode state (JSON fields), step counter, phase timestamps."""
        return f"{self.prefix}:ep:{episode_id}"

    def history(self, episode_id: str) -> str:
        """List: the episode's messages / actions / observations, one JSON record each."""
        return f"{self.prefix}:ep:{episode_id}:hist"

    def batch(self, batch_id: str) -> str:
        """Hash: batch metadata (user, created, size)."""
        return f"{self.prefix}:batch:{batch_id}"

    def batch_episodes(self, batch_id: str) -> str:
        """List: episode ids of a batch in submission order."""
        return f"{self.prefix}:batch:{batch_id}:eps"

    def batch_done(self, batch_id: str) -> str:
        """Set: episode ids of a batch that reached a terminal state."""
        return f"{self.prefix}:batch:{batch_id}:done"

    @property
    def batches(self) -> str:
        """Sorted set: batch id -> creation time."""
        return f"{self.prefix}:batches"

    @property
    def live(self) -> str:
        """Sorted set: live (non-terminal) episode id -> time of its last step (for the sweep)."""
        return f"{self.prefix}:live"

    # --- records (megaflow.records) -------------------------------------------------------------
    @property
    def events(self) -> str:
        """Stream: every state change, consumed by the recorder group."""
        return f"{self.prefix}:events"

    # --- fleet (megaflow.fleet / worker health) -------------------------------------------------
    def worker_health(self, role: str, name: str) -> str:
        """String with TTL: a worker's last health report (JSON)."""
        return f"{self.prefix}:health:{role}:{name}"

    # --- resource manager (megaflow.engine.resources) --------------------------------------------------
    def res(self, *parts: str) -> str:
        """Namespace for the resource manager's keys (see megaflow/resources/)."""
        return ":".join((self.prefix, "res", *parts))

    # --- environment hosts (megaflow.env_hosts) -------------------------------------------------
    def env(self, *parts: str) -> str:
        """Namespace for env-host keys (registration, warm pools, image caches)."""
        return ":".join((self.prefix, "env", *parts))

    # --- model gateway (megaflow.model_gateway) -------------------------------------------------
    def model(self, *parts: str) -> str:
        """Namespace for model-gateway keys (endpoint health, stickiness, semaphores)."""
        return ":".join((self.prefix, "model", *parts))
