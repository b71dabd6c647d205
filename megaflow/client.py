"""The submission API: ``megaflow.Client(settings).submit(specs, user=...)`` and friends."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import redis

from megaflow.services import lifecycle
from megaflow.core import states
from megaflow.core.errors import ServiceUnavailableError, SpecError
from megaflow.services.root import Root
from megaflow.core.settings import Settings
from megaflow.core.spec import TaskSpec, validate_specs

_USER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


@dataclass
class Submission:
    """A submitted batch: its id and its episode ids in submission order."""

    batch_id: str
    episode_ids: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return self.batch_id


class Client:
    """Submit batches of task specs, follow them, and read their results."""

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings.load()
        self.rt = Root(self.settings, role="client")

    def _check_redis(self) -> None:
        try:
            self.rt.redis.ping()
        except redis.RedisError as exc:
            raise ServiceUnavailableError(
                f"cannot reach Redis at MEGAFLOW_REDIS_URL ({_safe_url(self.settings.redis_url)}): {exc}; "
                "start it (`make demo` does) or fix the URL") from None

    def submit(self, specs: dict[str, Any] | TaskSpec | Iterable[dict[str, Any] | TaskSpec], *, user: str,
               batch_id: str | None = None) -> Submission:
        """Validate every spec, then enqueue them all as one batch; a bad spec enqueues nothing."""
        if not isinstance(user, str) or not _USER.match(user):
            raise SpecError("field 'user': must be 1-64 characters of letters, digits, '_', '.', '@' or '-'",
                            field="user")
        if isinstance(specs, (dict, TaskSpec)):
            specs = [specs]
        valid = validate_specs(list(specs))
        check_models(valid, self.settings)
        self._check_redis()
        bid, ids = self.rt.engine.create_batch(valid, user, batch_id)
        self.rt.resources.enqueue([
            {"episode_id": eid, "user": user, "image": spec.image or self.settings.default_image}
            for eid, spec in zip(ids, valid)
        ])
        lifecycle.admit(self.rt)
        return Submission(bid, ids)

    def status(self, batch_id: str) -> dict[str, Any]:
        """Counts by state of a batch, from the live episode state."""
        ids = self.rt.engine.batch_ids(batch_id)
        counts: dict[str, int] = {}
        for view in self.rt.engine.summaries(ids):
            counts[view["state"]] = counts.get(view["state"], 0) + 1
        done = sum(counts.get(s, 0) for s in states.TERMINAL)
        return {"batch_id": batch_id, "total": len(ids), "done": done, "counts": counts}

    def wait(self, batch_id: str, *, timeout: float | None = None, poll_s: float = 0.5,
             on_progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
        """Block until every episode of the batch is terminal (or ``timeout``); return status()."""
        total = len(self.rt.engine.batch_ids(batch_id))
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            done = self.rt.redis.scard(self.rt.keys.batch_done(batch_id))
            if on_progress:
                on_progress(done, total)
            if done >= total:
                return self.status(batch_id)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"batch {batch_id}: {done}/{total} episodes finished after {timeout}s")
            time.sleep(poll_s)

    def results(self, batch_id: str) -> list[dict[str, Any]]:
        """One result per episode: state, reward, cause, artifact URI, token counts, phase times."""
        return self.rt.engine.summaries(self.rt.engine.batch_ids(batch_id))

    def trajectory(self, episode_id: str) -> dict[str, Any]:
        """The saved trajectory of a finished episode."""
        import json

        view = self.rt.engine.summaries([episode_id])
        uri = view[0]["artifact_uri"] if view else None
        if not uri:
            doc = self.rt.metadata.get_task(episode_id) or {}
            uri = doc.get("artifact_uri")
        if not uri:
            from megaflow.core.errors import NotFoundError

            raise NotFoundError(f"episode {episode_id} has no trajectory yet (not finished, or unknown)")
        return json.loads(self.rt.artifacts.get_bytes(uri))

    def cancel(self, batch_id: str) -> int:
        """End every unfinished episode of the batch now (any state); return how many it ended."""
        n = sum(1 for eid in self.rt.engine.batch_ids(batch_id) if self.rt.lifecycle.cancel(eid))
        self.rt.lifecycle.admit()
        return n

    def rollout(self, tasks: Iterable[Any], *, replicas: int = 1, policy_version: str | None = None,
                user: str = "rollout", max_infra_retries: int = 2, timeout: float | None = None,
                trajectories: bool = True):
        """Run every task ``replicas`` times; iterate over the groups (rewards, trajectories, token data).

        Tasks are TaskSpec dicts or SWE-bench instances. Submits at once and returns a RolloutRun
        (its ``batch_id`` names the batch) that yields each group as soon as all its replicas are
        final. Infra failures are retried as new episodes up to ``max_infra_retries`` times; a group
        still holding one comes with ``masked: true``. See megaflow.rollout.
        """
        from megaflow.rollout import Rollout

        return Rollout(self, replicas=replicas, user=user, policy_version=policy_version,
                       max_infra_retries=max_infra_retries, timeout=timeout, trajectories=trajectories).run(tasks)

    def resume(self, batch_id: str):
        """Re-run a batch's infra failures as a new batch; skip what finished. Returns a ResumeResult."""
        from megaflow.rollout import resume

        self._check_redis()
        return resume(self, batch_id)

    def final_results(self, batch_id: str) -> list[dict[str, Any]]:
        """results() with re-runs (resume, rollout retries) in place of the episodes they replaced."""
        from megaflow.rollout import final_results

        return final_results(self, batch_id)

    def close(self) -> None:
        self.rt.redis.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_models(specs: list[TaskSpec], settings: Settings) -> None:
    """Reject, at submit, a model section its backend would refuse at run time."""
    from megaflow.model_gateway import BACKENDS

    for i, spec in enumerate(specs):
        backend = spec.model.backend or settings.model_backend
        if backend not in BACKENDS:
            raise SpecError(f"field 'model.backend': unknown backend {backend!r}; choose one of {sorted(BACKENDS)}",
                            index=i, field="model.backend")
        if backend == "scripted" and not spec.model.replies:
            raise SpecError("field 'model.replies': the scripted backend needs a non-empty list of replies",
                            index=i, field="model.replies")
        if backend == "openai":
            from megaflow.model_gateway.openai import parse_model_section

            try:
                parse_model_section(spec.model.model_dump(exclude_none=True, exclude={"backend"}), settings)
            except SpecError as exc:
                raise SpecError(f"field '{exc.field}': {exc}", index=i, field=exc.field) from None


def _safe_url(url: str) -> str:
    return re.sub(r"//[^@/]*@", "//***@", url)
