"""``megaflow status``: what the metadata store says about batches and users."""

from __future__ import annotations

from collections import Counter
from typing import Any

from megaflow.core import states
from megaflow.core.errors import NotFoundError
from megaflow.core.settings import Settings
from megaflow.stores import open_metadata_store


def _summarise(docs: list[dict[str, Any]]) -> dict[str, Any]:
    counts = Counter(d.get("state") for d in docs)
    finished = [d["phases"]["finished"] for d in docs if "finished" in d.get("phases", {})]
    submitted = [d["phases"]["submitted"] for d in docs if "submitted" in d.get("phases", {})]
    span = (max(finished) - min(submitted)) if finished and submitted else 0.0
    causes = states.failure_causes(docs)
    rewards = [d["reward"] for d in docs if isinstance(d.get("reward"), (int, float))]
    return {
        "total": len(docs),
        "counts": dict(counts),
        "finished": len(finished),
        "throughput_per_min": round(len(finished) / span * 60, 2) if span > 0 else None,
        "failures_by_cause": causes,
        "mean_reward": round(sum(rewards) / len(rewards), 4) if rewards else None,
    }


def _live_total(settings: Settings, batch_id: str) -> int:
    """Episodes Redis holds for a batch not yet in the metadata store; NotFoundError when Redis has none either."""
    import redis

    from megaflow.core.keys import Keys

    keys = Keys(settings.key_prefix)
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True, socket_connect_timeout=5)
    try:
        n = client.llen(keys.batch_episodes(batch_id))
        if not n and not client.exists(keys.batch(batch_id)):
            raise NotFoundError(f"batch {batch_id} not found; list recent batches with `megaflow status`")
        return n
    except redis.RedisError:
        raise NotFoundError(
            f"batch {batch_id} not found in the metadata store (and Redis, which would know a "
            "batch not yet recorded, is unreachable)"
        ) from None
    finally:
        client.close()


def batch_status(settings: Settings, batch_id: str) -> dict[str, Any]:
    """One batch's records; NotFoundError when neither the metadata store nor Redis knows the id."""
    store = open_metadata_store(settings.metadata_url, settings)
    try:
        docs = store.find_tasks(batch_id=batch_id)
    finally:
        store.close()
    if not docs:
        live = _live_total(settings, batch_id)
        return {"batch_id": batch_id, **_summarise(docs), "episodes": [], "unrecorded": live}
    episodes = [
        {k: d.get(k) for k in ("episode_id", "task_id", "state", "reward", "cause", "host", "steps", "fleet")}
        for d in docs
    ]
    return {"batch_id": batch_id, **_summarise(docs), "episodes": episodes}


def overview(settings: Settings, *, user: str | None = None, limit: int = 20) -> dict[str, Any]:
    store = open_metadata_store(settings.metadata_url, settings)
    try:
        batches = store.list_batches(user=user, limit=limit)
        out_batches: list[dict[str, Any]] = []
        per_user: dict[str, Counter] = {}
        for b in batches:
            docs = store.find_tasks(batch_id=b["batch_id"])
            out_batches.append(
                {
                    "batch_id": b["batch_id"],
                    "user": b.get("user"),
                    "created_at": b.get("created_at"),
                    **_summarise(docs),
                }
            )
            u = b.get("user") or "?"
            agg = per_user.setdefault(u, Counter())
            agg.update(Counter(d.get("state") for d in docs))
    finally:
        store.close()
    return {"batches": out_batches, "users": {u: dict(c) for u, c in per_user.items()}}
