"""Automatic execution mode per image, from the queue state in Redis (``policy.choose_mode`` decides).

Demand per image is read from the resource manager's own keys: episodes waiting in the FIFO, and
episodes queued or held whose submission falls in ``demand_window_s`` (the recent arrivals).
``auto_modes`` is meant for submit (a batch's own episodes count as arrivals); the chosen warm
pool sizes are published for env hosts in ``E:pools`` (hash image -> containers per host), which
every env worker's heartbeat reads (``published_pools``) and applies within its capacity.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from megaflow.elastic.config import ElasticConfig
from megaflow.elastic.policy import ModeChoice, choose_mode
from megaflow.elastic.usage import ElasticKeys, record_event


def image_demand(r, keys: Any, window_s: float, now_ms: int | None = None) -> tuple[Counter, Counter]:
    """(waiting, arrived): per image, episodes in the FIFO and those submitted within ``window_s``."""
    if now_ms is None:
        sec, usec = r.time()
        now_ms = int(sec) * 1000 + int(usec) // 1000
    cutoff = now_ms - window_s * 1000
    waiting: Counter = Counter()
    arrived: Counter = Counter()
    for _, raw in r.hscan_iter(keys.res("queued"), count=500):
        item = json.loads(raw)
        waiting[item["image"]] += 1
        if item.get("t", 0) >= cutoff:
            arrived[item["image"]] += 1
    for _, raw in r.hscan_iter(keys.res("held"), count=500):
        item = json.loads(raw)
        if item.get("t", 0) >= cutoff:
            arrived[item["image"]] += 1
    return waiting, arrived


def auto_modes(
    r, keys: Any, settings: Any, specs: list[Any], *, hosts: int, cfg: ElasticConfig | None = None
) -> dict[str, ModeChoice]:
    """The mode per image of a batch about to be submitted (its episodes count as arrivals).

    ``specs`` are TaskSpecs (or dicts) with ``image`` and ``mode``; a spec with its own mode keeps it.
    """
    cfg = cfg or ElasticConfig.from_settings(settings)
    waiting, arrived = image_demand(r, keys, cfg.demand_window_s)
    batch: Counter = Counter()
    forced: dict[str, str] = {}
    for spec in specs:
        image = _get(spec, "image") or settings.default_image
        batch[image] += 1
        if _get(spec, "mode"):
            forced[image] = _get(spec, "mode")
    return {
        image: choose_mode(image, waiting[image], arrived[image] + n, hosts, cfg, forced.get(image))
        for image, n in batch.items()
    }


def apply_modes(specs: list[dict], choices: dict[str, ModeChoice], default_image: str) -> list[dict]:
    """Spec dicts with ``mode`` filled in where the spec left it unset."""
    out = []
    for spec in specs:
        image = spec.get("image") or default_image
        out.append(spec if spec.get("mode") or image not in choices else {**spec, "mode": choices[image].mode})
    return out


def publish_pools(r, prefix: str, choices: dict[str, ModeChoice], *, now: float | None = None) -> None:
    """Record each choice as an event and publish the warm pool per host of persistent images."""
    keys = ElasticKeys(prefix)
    pipe = r.pipeline(transaction=False)
    for c in choices.values():
        if c.mode == "persistent":
            pipe.hset(keys.pools, c.image, c.pool_per_host)
        else:
            pipe.hdel(keys.pools, c.image)
    pipe.execute()
    for c in choices.values():
        record_event(
            r, keys, "mode", now=now, image=c.image, mode=c.mode, pool_per_host=c.pool_per_host, reason=c.reason
        )


def _get(spec: Any, name: str) -> Any:
    return spec.get(name) if isinstance(spec, dict) else getattr(spec, name, None)


def published_pools(r, prefix: str) -> dict[str, int]:
    """The warm pool per host the fleet asks for, by image (empty: hosts keep their static setting)."""
    return {image: int(n) for image, n in r.hgetall(ElasticKeys(prefix).pools).items()}
